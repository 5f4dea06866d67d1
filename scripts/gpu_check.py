"""The GPU check of issue 16, as one command (`bash scripts/gpu_check.sh`): every CUDA path of Jojo, run for real.

Stages, each timed and reported pass / fail / skipped:

1. gpu tests   tests/test_gpu.py (bf16, fp16 + GradScaler, compile vs eager, no recompilation, fused AdamW,
               Muon, `--batch-size auto` under a memory cap, the memory estimate vs max_memory_allocated,
               resume, host syncs per step, greedy decode GPU == CPU, the FlashAttention path)
2. prepare     `jojo prepare` of Jojo's embedded corpus (generated on the spot, no download)
3. train bf16  the `gpt2-124m` preset (its architecture; the vocabulary is the prepared tokenizer's, padded by
               the resolver) for 30 steps with bf16 autocast + torch.compile and `--batch-size auto`
4. resume      the same run continued with `--resume` to step 40 (eager, to keep the check short)
5. train fp16  12 steps in float16 with its GradScaler (the scaler's state is read back from the checkpoint)
6. decode      greedy decoding of the bf16 run's checkpoint on the GPU and on the CPU: same tokens?
7. benchmark   benchmarks/gpu_train.py: the GPT-2 124M step (vocab 50304, context 1024), bf16 + compile:
               tokens/s, MFU, peak memory, compile time

Without CUDA, stage 1 runs (every test skipped, and reported so), the others are skipped, and the command exits
0. `--quick` runs stage 1 only. The summary is printed and written as JSON (`--out`/summary.json). Exit status
1 when a check failed. The MFU target (>= 50%) is reported, not a check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"


def run(cmd: list[str], timeout: float, log: Path) -> tuple[int, str]:
    """Run a command from the repository root; its output goes to `log` and is returned (rc 124: timed out)."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout:.0f} s"
    log.write_text(f"$ {' '.join(cmd)}\n# {time.time() - t0:.1f} s, exit {rc}\n{out}")
    return rc, out


def jojo(*args: str) -> list[str]:
    return [sys.executable, "-m", "jojo.cli", *args]


def metrics(run_dir: Path, event: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == event]


def tail(text: str, n: int = 3) -> str:
    """The line that says what went wrong (a `jojo: error:` line or the exception), else the last lines."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("jojo: error") or "Error" in line.split(":")[0]]
    return (errors[-1] if errors else " | ".join(lines[-n:]))[:400]


# ---- stages ------------------------------------------------------------------------------------------------


def stage_tests(out: Path, timeout: float) -> dict:
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    rc, text = run([*cmd, f"--junitxml={xml}"], timeout, out / "gpu_tests.log")
    tests, figures = {}, {}
    if xml.is_file():
        for case in ET.parse(xml).iter("testcase"):
            name = case.get("name")
            status, why = "pass", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    status, why = "fail", (child.get("message") or "")[:300]
                elif child.tag == "skipped":
                    status, why = "skipped", child.get("message") or ""
                elif child.tag == "properties":
                    for prop in child:
                        figures[f"{name}: {prop.get('name')}"] = prop.get("value")
            tests[name] = {"status": status, "why": why} if why else {"status": status}
    counts = {s: sum(t["status"] == s for t in tests.values()) for s in ("pass", "fail", "skipped")}
    reasons = sorted({t["why"] for t in tests.values() if t["status"] == "skipped"})
    detail = f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped"
    if reasons:
        detail += f" ({'; '.join(r.removeprefix('Skipped: ') for r in reasons)})"
    if not tests:
        return {"status": "fail", "detail": f"pytest exit {rc}: {tail(text)}"}
    status = "fail" if rc not in (0, 5) or counts["fail"] else "pass" if counts["pass"] else "skipped"
    return {"status": status, "detail": detail, "tests": tests, "figures": figures}


def stage_prepare(out: Path, timeout: float) -> dict:
    data = out / "data"
    rc, text = run(
        jojo("prepare", "--docs", "60000", "--out", str(data), "--no-progress"), timeout, out / "prepare.log"
    )
    if rc or not (data / "meta.json").is_file():
        return {"status": "fail", "detail": tail(text)}
    meta = json.loads((data / "meta.json").read_text())
    tokens = meta["splits"]["train"]["tokens"]
    detail = f"embedded corpus: {tokens:,} training tokens, tokenizer of {meta['vocab_size']} tokens"
    return {"status": "pass", "detail": detail, "figures": {"train_tokens": tokens}}


def train_args(out: Path, run_dir: str, *extra: str) -> list[str]:
    return jojo(
        "train", "--config", "gpt2-124m", "--dataset", str(out / "data"), "--out", str(out / run_dir),
        "--logging.progress=false", "--schedule.warmup_steps=5", *extra,
    )  # fmt: skip


def check_losses(run_dir: Path, steps: int, since: int = 0) -> tuple[bool, str, dict]:
    """The run reached `steps` with finite losses; its figures (losses logged after step `since`)."""
    rows = [r for r in metrics(run_dir, "train") if r["step"] > since]
    losses = [r["loss"] for r in rows]
    if not rows or rows[-1]["step"] != steps:
        return False, f"reached step {rows[-1]['step'] if rows else 0} of {steps}", {}
    if not all(math.isfinite(v) for v in losses):
        return False, f"non-finite loss: {losses}", {}
    last = rows[-1]
    figures = {"loss_first": losses[0], "loss_last": losses[-1], "tokens_per_second": last["tokens_per_second"]}
    if last.get("mfu") is not None:
        figures["mfu"] = last["mfu"]
    evals = metrics(run_dir, "eval")
    if evals:
        figures["val_loss"] = evals[-1]["val_loss"]
    return True, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", figures


def stage_train_bf16(out: Path, timeout: float) -> dict:
    run_dir = out / "bf16"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--max-iters", "30", "--batch-size", "auto", "--global-batch", "64", "--dtype", "bfloat16", "--compile"]
    args += ["--eval-interval", "30", "--logging.eval_iters=4", "--log-interval", "5"]
    t0 = time.time()
    rc, text = run(train_args(out, "bf16", *args), timeout, out / "train_bf16.log")
    wall = time.time() - t0
    if rc:
        return {"status": "fail", "detail": tail(text)}
    ok, detail, figures = check_losses(run_dir, 30)
    auto = [line for line in text.splitlines() if line.startswith("batch-size auto:")]
    if not auto:
        ok, detail = False, "no 'batch-size auto' line in the output"
    else:
        figures["auto_micro_batch"] = int(auto[0].split(":")[1].split()[0])
        detail += f"; batch-size auto: {figures['auto_micro_batch']} rows"
    figures["wall_s"] = wall
    ok = ok and figures["loss_last"] < figures["loss_first"]
    return {"status": "pass" if ok else "fail", "detail": detail, "figures": figures}


def stage_resume(out: Path, timeout: float) -> dict:
    run_dir = out / "bf16"
    if not (run_dir / "latest").exists():
        return {"status": "skipped", "detail": "no bf16 run to resume"}
    args = ["--max-iters", "40", "--batch-size", "auto", "--global-batch", "64", "--dtype", "bfloat16"]
    args += ["--compile=false", "--eval-interval", "40", "--logging.eval_iters=4", "--log-interval", "5", "--resume"]
    rc, text = run(train_args(out, "bf16", *args), timeout, out / "resume.log")
    if rc:
        return {"status": "fail", "detail": tail(text)}
    ok, detail, figures = check_losses(run_dir, 40, since=30)
    state = json.loads((run_dir / "latest" / "state.json").read_text())
    ok = ok and state["step"] == 40
    return {"status": "pass" if ok else "fail", "detail": f"step 30 -> {state['step']}; {detail}", "figures": figures}


def stage_train_fp16(out: Path, timeout: float) -> dict:
    import torch

    run_dir = out / "fp16"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--max-iters", "12", "--batch-size", "8", "--global-batch", "8", "--dtype", "float16", "--compile=false"]
    args += ["--eval-interval", "12", "--logging.eval_iters=2", "--log-interval", "1"]
    rc, text = run(train_args(out, "fp16", *args), timeout, out / "train_fp16.log")
    if rc:
        return {"status": "fail", "detail": tail(text)}
    ok, detail, figures = check_losses(run_dir, 12)
    saved = torch.load(run_dir / "latest" / "optimizer.pt", map_location="cpu", weights_only=True)
    scaler = saved.get("scaler")
    if not scaler:
        return {"status": "fail", "detail": "the checkpoint holds no GradScaler state"}
    scale = float(scaler["scale"])
    figures["grad_scale"] = scale
    ok = ok and math.isfinite(scale) and scale > 0
    detail += f"; GradScaler scale {scale:g} (starts at 65536; halves at each overflow)"
    return {"status": "pass" if ok else "fail", "detail": detail, "figures": figures}


def decode_worker(run_dir: str, device: str) -> None:
    """Greedy decode of a checkpoint on one device (a subprocess of the decode stage); prints JSON."""
    import torch

    from jojo.checkpoint import load_checkpoint
    from jojo.infer.engine import SamplingConfig, generate

    model, tok, _ = load_checkpoint(run_dir, torch.device(device))
    sc = SamplingConfig(max_tokens=64, temperature=0)
    ids = tok.encode(PROMPT)
    generate(model, ids, SamplingConfig(max_tokens=4, temperature=0), tok.vocab_size)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    new = generate(model, ids, sc, tok.vocab_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(json.dumps({"ids": new, "seconds": seconds, "text": tok.decode(new)}))


def stage_decode(out: Path, timeout: float) -> dict:
    run_dir = out / "bf16"
    if not (run_dir / "latest").exists():
        return {"status": "skipped", "detail": "no checkpoint to decode"}
    results = {}
    for device in ("cuda", "cpu"):
        cmd = [sys.executable, __file__, "--decode-worker", str(run_dir), device]
        rc, text = run(cmd, timeout / 2, out / f"decode_{device}.log")
        if rc:
            return {"status": "fail", "detail": f"{device}: {tail(text)}"}
        results[device] = json.loads(text.strip().splitlines()[-1])
    gpu, cpu = results["cuda"], results["cpu"]
    same = gpu["ids"] == cpu["ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(gpu["ids"], cpu["ids"])) if a != b), None)
    figures = {
        "tokens": len(gpu["ids"]),
        "gpu_tokens_per_second": len(gpu["ids"]) / max(gpu["seconds"], 1e-9),
        "cpu_tokens_per_second": len(cpu["ids"]) / max(cpu["seconds"], 1e-9),
        "same_tokens_as_cpu": same,
        "text": gpu["text"][:200],
    }
    detail = f"{len(gpu['ids'])} greedy tokens on the GPU, " + (
        "identical to the CPU's" if same else f"differ from the CPU's from token {first_diff}"
    )
    return {"status": "pass" if same and gpu["ids"] else "fail", "detail": detail, "figures": figures}


def bench_batch(total_memory: int) -> int:
    """Rows for the 124M benchmark step by GPU memory (the float32 logits of 50304 tokens dominate)."""
    gib = total_memory / 2**30
    return 32 if gib >= 70 else 16 if gib >= 35 else 8 if gib >= 20 else 4


def stage_bench(out: Path, timeout: float, batch: int) -> dict:
    path = out / "benchmark.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "benchmarks/gpu_train.py", "--batch", str(batch), "--steps", "30", "--json", str(path)]
    rc, text = run(cmd, timeout, out / "benchmark.log")
    if rc or not path.is_file():
        return {"status": "fail", "detail": tail(text)}
    res = json.loads(path.read_text())
    mfu = f", MFU {100 * res['mfu']:.1f}%" if res["mfu"] is not None else ", MFU n/a (GPU not in the peak table)"
    detail = f"{res['tokens_per_second']:,.0f} tokens/s at batch {batch} x {res['ctx']}{mfu}"
    ok = res["tokens_per_second"] > 0 and math.isfinite(res["loss_last"])
    return {"status": "pass" if ok else "fail", "detail": detail, "figures": res}


def headline_text(h: dict, cuda: bool) -> str:
    if h["tokens_per_second"] is None:
        return "benchmark: not run" + ("" if cuda else " (no GPU): no GPU figures measured")
    parts = [f"benchmark: {h['tokens_per_second']:,.0f} tokens/s (batch {h['batch']} x 1024)"]
    if h["mfu"] is None:
        parts.append("MFU n/a (GPU not in jojo.train.system.PEAK_FLOPS)")
    else:
        parts.append(f"MFU {100 * h['mfu']:.1f}% (target 50%: {'reached' if h['mfu'] >= 0.5 else 'not reached'})")
    if h["peak_memory_gib"] is not None:
        parts.append(f"peak memory {h['peak_memory_gib']:.1f} GiB")
    if h["compile_s"] is not None:
        parts.append(f"compile {h['compile_s']:.1f} s")
    return ", ".join(parts)


# ---- main --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Jojo's GPU check (issue 16): one command, one summary.")
    ap.add_argument("--out", default="runs/gpu_check", help="work folder; the summary is OUT/summary.json")
    ap.add_argument("--quick", action="store_true", help="the GPU tests only (what CI runs)")
    ap.add_argument("--bench-batch", type=int, help="rows for the benchmark step (default: by GPU memory)")
    ap.add_argument("--decode-worker", nargs=2, metavar=("RUN", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.decode_worker:
        decode_worker(*args.decode_worker)
        return 0

    import torch

    t_start = time.time()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    print(f"GPU check (issue 16): {gpu or 'no CUDA device'}; torch {torch.__version__}", flush=True)
    summary = {
        "gpu": gpu,
        "cuda": cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "quick": args.quick,
        "checks": {},
    }
    stages = [("gpu tests", lambda: stage_tests(out, 300))]
    gpu_stages = [
        ("prepare", lambda: stage_prepare(out, 120)),
        ("train bf16 + compile, batch-size auto", lambda: stage_train_bf16(out, 300)),
        ("resume", lambda: stage_resume(out, 180)),
        ("train fp16 + GradScaler", lambda: stage_train_fp16(out, 180)),
        ("decode GPU vs CPU", lambda: stage_decode(out, 180)),
    ]
    if cuda:
        batch = args.bench_batch or bench_batch(torch.cuda.get_device_properties(0).total_memory)
        gpu_stages.append(("benchmark gpt2-124m bf16 + compile", lambda: stage_bench(out, 400, batch)))
    else:
        gpu_stages.append(("benchmark gpt2-124m bf16 + compile", None))
    for name, fn in stages + gpu_stages:
        if fn is None or (name != "gpu tests" and (not cuda or args.quick)):
            why = "no CUDA device (torch.cuda.is_available() is False)" if not cuda else "--quick"
            result = {"status": "skipped", "detail": why}
        else:
            t0 = time.time()
            try:
                result = fn()
            except Exception as exc:  # a broken stage is a failed check, and the others still run
                result = {"status": "fail", "detail": f"{type(exc).__name__}: {exc}"[:400]}
            result["seconds"] = round(time.time() - t0, 1)
        summary["checks"][name] = result
        took = f" ({result['seconds']:.0f} s)" if "seconds" in result else ""
        print(f"  {result['status']:<8} {name}: {result['detail']}{took}", flush=True)

    bench = summary["checks"]["benchmark gpt2-124m bf16 + compile"].get("figures") or {}
    headline = {
        "tokens_per_second": bench.get("tokens_per_second"),
        "mfu": bench.get("mfu"),
        "peak_memory_gib": bench.get("peak_memory_gib"),
        "compile_s": bench.get("compile_s"),
        "step": "gpt2-124m (vocab 50304), context 1024, bf16 + torch.compile, fused AdamW" if bench else None,
        "batch": bench.get("batch"),
    }
    mfu = headline["mfu"]
    summary["figures"] = headline
    summary["mfu_target"] = {
        "target": 0.5,
        "reached": None if mfu is None else mfu >= 0.5,
    }
    failed = [n for n, r in summary["checks"].items() if r["status"] == "fail"]
    summary["passed"] = not failed
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")

    print(headline_text(headline, cuda), flush=True)
    verdict = "FAILED: " + ", ".join(failed) if failed else "all checks passed or skipped"
    print(f"{verdict}; {summary['wall_seconds']:.0f} s; summary -> {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
