"""What a run reports: a JSONL log of metrics, the loss-curve PNG, and optional TensorBoard / W&B.

Only rank 0 constructs a Monitor. `metrics.jsonl` is appended one JSON object per event, so a crash loses at
most the line being written, and `jojo plot RUN_DIR` can redraw the PNG from it at any time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jojo.errors import JojoError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise JojoError(f"no {METRICS_FILE} in {run_dir}; is it a Jojo run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train and val loss against step from metrics.jsonl into loss.png (atomically replaced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r.get("event") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("event") == "eval"]
    if not train and not val:
        raise JojoError(f"{run_dir / METRICS_FILE} holds no losses yet; train first")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="val", marker="o", markersize=3, linewidth=1.5)
    floors = [r["entropy_floor_loss"] for r in rows if r.get("event") == "eval" and r.get("entropy_floor_loss")]
    if floors:
        ax.axhline(floors[-1], color="grey", linestyle="--", linewidth=1, label="entropy floor")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else run_dir / PLOT_FILE
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


class Monitor:
    def __init__(self, run_dir: str | Path, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if not resume and path.exists():
            path.unlink()
        self._fh = open(path, "a")

    def log(self, event: str, step: int, **values) -> None:
        row = {"event": event, "step": step, **values}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def plot(self) -> None:
        plot_run(self.run_dir)

    def close(self) -> None:
        self._fh.close()
