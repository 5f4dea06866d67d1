#!/usr/bin/env bash
# Jojo's GPU check (issue 16): every CUDA path run for real, one summary, one JSON file.
#
#   bash scripts/gpu_check.sh              # on a GPU machine after `JOJO_TORCH_INDEX=... bash scripts/setup.sh --dev`
#   bash scripts/gpu_check.sh --quick      # the GPU tests only (CI runs this; on CPU they are all skipped)
#   bash scripts/gpu_check.sh --out DIR --bench-batch 16
#
# Runs tests/test_gpu.py, a short gpt2-124m training run (bf16 + compile, --batch-size auto) on Jojo's embedded
# corpus, a resume, an fp16 run, GPU decoding against the CPU, and benchmarks/gpu_train.py; prints the summary
# (tokens/s, MFU, peak memory, compile time, pass/fail per check) and writes it to runs/gpu_check/summary.json.
# About 5 minutes on one H100-class GPU; under a minute without CUDA (GPU parts skipped, exit status 0).
# Python: $PYTHON, else .venv/bin/python, else python3; this checkout's src/ comes first on the import path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
