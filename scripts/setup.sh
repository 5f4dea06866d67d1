#!/usr/bin/env bash
# Set up Jojo in a virtual environment (.venv) on a fresh machine.
#
#   bash scripts/setup.sh          # the package and its runtime dependencies
#   bash scripts/setup.sh --dev    # plus test, lint, data, export and logging extras
#
# PyTorch is installed first and pinned, so pip never resolves a loose `torch` requirement to the newest
# CUDA build (several GB of wheels) on a machine without a GPU:
#   - no NVIDIA GPU (no nvidia-smi): torch==$JOJO_TORCH_VERSION (default 2.13.0), the CPU build where the
#     package index offers one; set JOJO_TORCH_INDEX=https://download.pytorch.org/whl/cpu to force PyTorch's
#     own CPU wheels;
#   - NVIDIA GPU: set JOJO_TORCH_INDEX to the CUDA index matching your driver, e.g.
#     JOJO_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
#     (without it, PyPI's default CUDA build of the pinned version is installed);
#   - torch already importable in the environment (e.g. JOJO_VENV=system): left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=""
[ "${1:-}" = "--dev" ] && EXTRAS="[dev]"
PY="${PYTHON:-python3}"
VENV="${JOJO_VENV:-.venv}"
if [ "$VENV" = "system" ]; then
  PIP=("$PY" -m pip)
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip)
  PY="$VENV/bin/python"
fi
TORCH_VERSION="${JOJO_TORCH_VERSION:-2.13.0}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  INDEX_ARGS=()
  [ -n "${JOJO_TORCH_INDEX:-}" ] && INDEX_ARGS=(--index-url "$JOJO_TORCH_INDEX")
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found; installing torch==$TORCH_VERSION ${JOJO_TORCH_INDEX:+from $JOJO_TORCH_INDEX}"
  else
    echo "setup: no GPU; installing the pinned torch==$TORCH_VERSION first (CPU build where available)"
  fi
  "${PIP[@]}" install -q "torch==$TORCH_VERSION" "${INDEX_ARGS[@]}"
fi
"${PIP[@]}" install -q -e ".$EXTRAS"
echo "setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
