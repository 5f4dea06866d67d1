"""What a run reports: a JSONL log of metrics, the loss-curve PNG, and optional TensorBoard / W&B.

Only rank 0 constructs a Monitor. `metrics.jsonl` is appended one JSON object per event, so a crash loses at
most the line being written, and `jojo plot RUN_DIR` can redraw the PNG from it at any time.

Optional integrations live here and only here, imported when switched on, and see only the numbers the loop
already logs at its log interval (never a per-step device sync):

- `logging.tensorboard`: `torch.utils.tensorboard.SummaryWriter` into RUN_DIR/tensorboard: every numeric field
  as a scalar `<event>/<name>` (train/loss, train/lr, eval/val_loss, ...) and a text sample at each evaluation.
  View with `tensorboard --logdir RUN_DIR/tensorboard`.
- `logging.wandb`: Weights & Biases, the same scalars and samples (`WANDB_MODE=offline` runs without an account;
  `wandb sync` uploads later).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jojo.errors import JojoError, annotate, ensure_dir

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
    evals = [r for r in rows if r.get("event") == "eval"]
    task_keys = sorted({k for r in evals for k in r if "/" in k and isinstance(r[k], (int, float))})
    if task_keys:  # zero-shot task metrics (--eval-tasks) in a second panel beside the losses
        fig, (ax, ax_tasks) = plt.subplots(1, 2, figsize=(12, 4), dpi=110)
        for key in task_keys:
            points = [(r["step"], r[key]) for r in evals if key in r]
            ax_tasks.plot(*zip(*points), label=key, marker="o", markersize=3, linewidth=1.2)
        ax_tasks.set_xlabel("step")
        ax_tasks.set_ylabel("task metric")
        ax_tasks.grid(alpha=0.3)
        ax_tasks.legend(fontsize=7)
    else:
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
    ensure_dir(out.parent)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        annotate(exc, doing=f"drawing {out.name}", path=out.parent)
        raise
    finally:
        plt.close(fig)
    return out


def _open_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise JojoError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _open_wandb(run_dir: Path, cfg, resume: bool):
    try:
        import wandb
    except ImportError:
        raise JojoError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(
        project=cfg.logging.wandb_project,
        name=run_dir.resolve().name,
        dir=str(run_dir),
        config=cfg.to_dict(),
        resume="allow" if resume else None,
        id=_wandb_id(run_dir, resume),
    )


def _wandb_id(run_dir: Path, resume: bool) -> str:
    """One W&B run per run directory: the id is kept in RUN_DIR/wandb_id so --resume continues the same run."""
    import uuid

    path = run_dir / "wandb_id"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


class Monitor:
    def __init__(self, run_dir: str | Path, cfg=None, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if not resume and path.exists():
            path.unlink()
        log = cfg.logging if cfg is not None else None
        self.tb = _open_tensorboard(self.run_dir) if log and log.tensorboard else None
        self.wandb = _open_wandb(self.run_dir, cfg, resume) if log and log.wandb else None
        self.sample_tokens = log.sample_tokens if log else 0
        self._fh = open(path, "a")

    @property
    def wants_sample(self) -> bool:
        return bool(self.sample_tokens and (self.tb or self.wandb))

    def log(self, event: str, step: int, **values) -> None:
        row = {"event": event, "step": step, **values}
        try:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk: the OS names no file
            annotate(exc, doing=f"appending to {METRICS_FILE}", path=self.run_dir)
            raise
        scalars = {
            f"{event}/{k}": float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.tb and scalars:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb and scalars:
            self.wandb.log(scalars, step=step)

    def sample(self, step: int, model, tokenizer) -> str:
        """A short sample (temperature 0.8, top-k 50, seeded by the step) of a fresh document, from the training
        model as it is (no inference conversion: its weights keep training)."""
        from jojo.infer.engine import SamplingConfig, TextGenerator

        was_training = model.training
        model.eval()
        gen = TextGenerator(model, tokenizer)
        sc = SamplingConfig(max_tokens=self.sample_tokens, temperature=0.8, top_k=50, seed=step)
        text = gen.text(gen.prompt_ids(""), sc)
        model.train(was_training)
        if self.tb:
            self.tb.add_text("sample", text, step)
        if self.wandb:
            self.wandb.log({"sample": text}, step=step)
        return text

    def plot(self) -> None:
        plot_run(self.run_dir)
        if self.tb:
            self.tb.flush()

    def close(self) -> None:
        self._fh.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
