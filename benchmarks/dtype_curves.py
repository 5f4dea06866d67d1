"""float32 vs bf16 autocast: the same run twice (same preset, data, seed and steps), loss curves side by side.

`--dtype auto` trains in bf16 on CPUs with native bf16; this is the evidence that it learns the same. Both runs
are eager (`--no-compile`, so only the dtype differs) on the TinyStories excerpt prepared as in
`learning_curve.py` (BPE of 4096, 5% held out). Prints train loss (mean over each log interval) and validation
loss at each evaluation for both, their difference, the time per step, and writes a PNG of both curves.

    python benchmarks/dtype_curves.py --preset tiny --steps 400
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_curve import SHARED, prepare_data  # noqa: E402


def run(preset: str, data: Path, out: Path, dtype: str, steps: int, seed: int) -> list[dict]:
    import jojo

    jojo.pretrain(
        preset,
        dataset=data,
        out=out,
        overrides=[
            f"--dtype={dtype}",
            "--no-compile",
            "--device=cpu",
            f"--seed={seed}",
            f"--max-iters={steps}",
            "--logging.eval_interval=50",
            "--logging.eval_iters=0",
            "--logging.progress=false",
        ],  # fmt: skip
        quiet=True,
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/jojo-dtype-curves")
    ap.add_argument("--shared", default=str(SHARED))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data("tinystories", work, Path(args.shared))
    curves = {}
    for dtype in ("float32", "bfloat16"):
        out = work / f"run-{args.preset}-{dtype}-{args.steps}-{args.seed}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        curves[dtype] = run(args.preset, data, out, dtype, args.steps, args.seed)
    train = {d: {r["step"]: r for r in c if r.get("event") == "train"} for d, c in curves.items()}
    val = {d: {r["step"]: r["val_loss"] for r in c if r.get("event") == "eval"} for d, c in curves.items()}
    print(f"preset {args.preset}, {args.steps} steps, seed {args.seed}, TinyStories excerpt")
    print("| step | train loss fp32 | train loss bf16 | diff | val loss fp32 | val loss bf16 | diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for step in sorted(val["float32"]):
        a, b = train["float32"].get(step), train["bfloat16"].get(step)
        ta, tb = (a or {}).get("loss"), (b or {}).get("loss")
        va, vb = val["float32"][step], val["bfloat16"].get(step)
        tr = f"{ta:.4f} | {tb:.4f} | {tb - ta:+.4f}" if ta is not None and tb is not None else "- | - | -"
        print(f"| {step} | {tr} | {va:.4f} | {vb:.4f} | {vb - va:+.4f} |")
    for dtype, rows in train.items():
        rates = [r["tokens_per_second"] for r in rows.values() if "tokens_per_second" in r][1:]
        if rates:
            print(f"{dtype}: median {sorted(rates)[len(rates) // 2]:,.0f} tokens/s")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for dtype in curves:
            steps = sorted(train[dtype])
            ax.plot(steps, [train[dtype][s]["loss"] for s in steps], label=f"train {dtype}")
            vs = sorted(val[dtype])
            ax.plot(vs, [val[dtype][s] for s in vs], "o--", label=f"val {dtype}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
        ax.legend()
        fig.tight_layout()
        png = work / f"dtype-curves-{args.preset}.png"
        fig.savefig(png, dpi=100)
        print(f"plot: {png}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
