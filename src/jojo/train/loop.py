"""The one training loop, for pretraining and fine-tuning alike.

A run is: a config, a model (fresh, `init_from` weights, or resumed), a training batch source and a
validation batch source. Pretraining reads prepared token shards; SFT passes its own sources (masked targets,
packed rows) through the same `fit`. Sources implement `next_batch() -> dict`, `state_dict()`,
`load_state_dict()`, `steps_per_epoch` and, for validation, `iter_sequential(max_batches)`.

`fit` reads as the steps of a run: `start_run` (wrap, optimizer, budget), `restore` (resume), `open_monitor`,
then per step `optimizer_step` (the LR from the schedule, `grad_accum` micro-batches with DDP syncing gradients
on the last only, clip, step), `log_progress`, `evaluate_and_save`, and `finish`. Every `eval_interval` steps
(and at the end): validation loss and bits per byte, a checkpoint, the loss plot; with `logging.patience` the
run stops early after that many evaluations without a better validation loss. Ctrl+C or SIGTERM finishes the
current step, saves, and exits cleanly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jojo import checkpoint as ckpt_io
from jojo.config import TrainConfig
from jojo.errors import JojoError
from jojo.eval.lm import LN2, evaluate_loss
from jojo.model import GPT, IGNORE_INDEX
from jojo.tokenizer import Tokenizer
from jojo.train.optim import build_optimizer
from jojo.train.schedule import lr_multiplier
from jojo.train.system import (
    Runtime,
    batch_to_device,
    peak_flops,
    resolve_compile,
    seed_everything,
    wrap_for_training,
)


@dataclass
class FitResult:
    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    best_val_loss: float | None
    tokens_per_second: float
    tokens_seen: int
    wall_seconds: float
    stopped_early: bool = False
    interrupted: bool = False

    @property
    def checkpoint(self) -> Path:
        """The run's latest checkpoint directory."""
        return (self.run_dir / "latest").resolve()


UNBOUNDED = 10**12  # the step "budget" of a run that a time budget ends


def total_steps(cfg: TrainConfig, steps_per_epoch: int, tokens_per_step: int) -> int:
    s = cfg.schedule
    if s.max_seconds:  # a time budget ends the run at its deadline; a step count would only cut it short
        return UNBOUNDED
    if s.max_steps:
        return s.max_steps
    if s.epochs:
        return max(1, int(round(s.epochs * steps_per_epoch)))
    if s.max_tokens:
        return max(1, s.max_tokens // tokens_per_step)
    raise JojoError("no training budget: set one of --max-iters, --epochs or --max-tokens (schedule.*)")


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl+C aborts)."""

    def __init__(self):
        self.raised = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Run:
    """Everything one training run carries from step to step: the pieces it was given, what it built (the
    wrapped model, optimizer, scaler, monitor) and its progress (step, tokens, best validation loss, ...)."""

    cfg: TrainConfig
    model: GPT
    tokenizer: Tokenizer
    train_source: object
    val_source: object
    rt: Runtime
    train_model: torch.nn.Module
    optimizer: object
    scaler: object
    steps: int
    tokens_per_step: int
    bytes_per_token: float | None = None
    entropy_floor_bpb: float | None = None
    extra_state: dict | None = None
    state_dict_fn: Callable[[], dict] | None = None
    monitor: object = None
    bar: object = None
    plain_log: bool = False
    step: int = 0
    start_step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    evals_without_gain: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    loss_sum: torch.Tensor | None = None  # summed per-token losses since the last log line (on the device)
    loss_tokens: int = 0  # how many tokens they are
    t_window: float = 0.0
    tok_window: int = 0
    elapsed_before: float = 0.0  # training seconds of the run before this process (a resumed run)
    warmup_elapsed: float | None = None  # under a time budget: training seconds when warm-up ended
    t_start: float = 0.0

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    @property
    def out_of_time(self) -> bool:
        return bool(self.cfg.schedule.max_seconds) and self.elapsed >= self.cfg.schedule.max_seconds


def fit(
    cfg: TrainConfig,
    model: GPT,
    tokenizer: Tokenizer,
    train_source,
    val_source,
    rt: Runtime,
    *,
    bytes_per_token: float | None = None,
    entropy_floor_bpb: float | None = None,
    resume_from: Path | None = None,
    extra_state: dict | None = None,
    quiet: bool = False,
    state_dict_fn: Callable[[], dict] | None = None,
) -> FitResult:
    """Train `model` (already on rt.device) per `cfg`; checkpoints go to cfg.logging.out_dir.

    state_dict_fn: the weights to save, when they are not `model`'s own state dict (LoRA saves the adapters
    merged into the base weights, so checkpoints stay plain GPT weights)."""
    extra = dict(bytes_per_token=bytes_per_token, entropy_floor_bpb=entropy_floor_bpb, extra_state=extra_state)
    run = start_run(cfg, model, tokenizer, train_source, val_source, rt, state_dict_fn=state_dict_fn, **extra)
    if resume_from is not None:
        restore(run, resume_from)
    open_monitor(run, resumed=resume_from is not None, quiet=quiet)
    log = cfg.logging
    t_start = t_last_save = run.t_window = run.t_start = time.time()
    interrupted = stopped_early = False
    with _StopFlag() as stop:
        while run.step < run.steps:
            optimizer_step(run)
            out_of_time = run.out_of_time
            if run.step % log.log_interval == 0 or run.step == run.steps or out_of_time:
                log_progress(run, time.time() - t_start)
            if run.bar:
                run.bar.update(1)
            last = run.step == run.steps or stop.raised or out_of_time
            if run.step % log.eval_interval == 0 or last:
                stopped_early = evaluate_and_save(run) and not last
                t_last_save = time.time()
            elif (log.checkpoint_interval and run.step % log.checkpoint_interval == 0) or (
                log.checkpoint_minutes and time.time() - t_last_save >= 60 * log.checkpoint_minutes
            ):
                save(run, None, False)
                t_last_save = time.time()
            if stop.raised:
                interrupted = True
                break
            if out_of_time:
                break
            if stopped_early:
                if run.monitor:
                    run.monitor.log("early_stop", run.step, patience=log.patience, best_val_loss=run.best_val)
                break
    return finish(run, time.time() - t_start, interrupted, stopped_early)


def start_run(cfg: TrainConfig, model: GPT, tokenizer, train_source, val_source, rt: Runtime, **extra) -> Run:
    """Seed, wrap the model for training (compile, DDP/FSDP2), build the optimizer and size the run."""
    seed_everything(cfg.system.seed + rt.rank)
    if cfg.logging.eval_tasks:  # a typo or missing task data fails now, not at the first evaluation
        from jojo.eval.tasks import load_items, split_names

        for name in split_names(cfg.logging.eval_tasks):
            load_items(name, cfg.logging.eval_data_dir or None, limit=1)
    if rt.fsdp and cfg.optimizer.name == "muon":
        raise JojoError("optimizer.name=muon does not work with --system.fsdp (it needs whole matrices); use adamw")
    tokens_per_step = cfg.data.batch_size * model.config.block_size * cfg.optimizer.grad_accum * rt.world_size
    steps = total_steps(cfg, max(train_source.steps_per_epoch // cfg.optimizer.grad_accum, 1), tokens_per_step)
    # Wrap first: FSDP2 turns the parameters into sharded DTensors, and the optimizer must hold those.
    compiled = resolve_compile(cfg.system.compile, rt, steps, cfg.schedule.max_seconds)
    train_model = wrap_for_training(model, rt, compiled)
    if compiled and rt.is_main:
        print("compiling the model (torch.compile; the first steps wait for it, --no-compile to skip)",
              file=sys.stderr, flush=True)  # fmt: skip
    optimizer = build_optimizer(model, cfg.optimizer, rt.device.type, rt.dtype)
    return Run(cfg, model, tokenizer, train_source, val_source, rt, train_model, optimizer, rt.grad_scaler(),
               steps, tokens_per_step, **extra)  # fmt: skip


def restore(run: Run, resume_from: Path) -> None:
    """Continue from a checkpoint: optimizer (and scaler) state, random state, data position, progress."""
    state = ckpt_io.load_optimizer_state(resume_from)
    if state is None:
        raise JojoError(f"checkpoint {resume_from} has no optimizer state; use --init-from to start from its weights")
    meta = _read_state(resume_from)
    _load_optimizer(run.model, run.optimizer, state["optimizer"], run.rt)
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and "rng_cuda" in state and run.rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], run.rt.device)
    run.train_source.load_state_dict(meta["data"])
    run.step = run.start_step = meta["step"]
    run.best_val = meta.get("best_val_loss", math.inf) or math.inf
    run.tokens_seen = meta.get("tokens_seen", 0)
    run.elapsed_before = meta.get("elapsed", 0.0)
    # a checkpoint from before this was saved: its decay is taken to have started at 0 s, as it did then
    run.warmup_elapsed = meta.get("warmup_elapsed", 0.0 if run.step >= run.cfg.schedule.warmup_steps else None)
    if run.cfg.schedule.max_seconds and run.elapsed_before >= run.cfg.schedule.max_seconds:
        raise JojoError(
            f"the checkpoint is at {run.elapsed_before:.0f} s, already at the time budget of "
            f"{run.cfg.schedule.max_seconds:.0f} s; raise --time-budget to train further"
        )
    if run.step >= run.steps:
        raise JojoError(
            f"the checkpoint is at step {run.step}, already at the budget of {run.steps} steps; "
            "raise --max-iters to train further"
        )


def open_monitor(run: Run, resumed: bool, quiet: bool) -> None:
    """Rank 0 logs: metrics.jsonl (and TensorBoard / W&B), run_config.json for a new run, a progress bar."""
    if not run.rt.is_main:
        return
    from jojo.train.monitor import Monitor

    run.monitor = Monitor(run.cfg.logging.out_dir, run.cfg, resume=resumed)
    if not resumed:
        run.cfg.save(Path(run.cfg.logging.out_dir) / "run_config.json")
    if run.cfg.logging.progress and not quiet:
        if not sys.stderr.isatty():  # a log file gets one plain line per log interval, not hundreds of \r updates
            run.plain_log = True
            return
        from tqdm import tqdm

        total = None if run.steps == UNBOUNDED else run.steps
        run.bar = tqdm(total=total, initial=run.step, desc="train", dynamic_ncols=True, leave=True)


WARMUP_MAX_BUDGET_FRACTION = 0.5  # under a time budget, warm-up ends by half of it even if its steps are not done


def budget_progress(run: Run) -> float | None:
    """Under a time budget, the fraction of the time after warm-up that has passed (None without a budget).
    Warm-up is counted in steps, so the decay starts from the peak LR wherever warm-up ended on the clock; on a
    machine too slow to finish those steps in half the budget, warm-up ends there, so the decay still happens."""
    budget = run.cfg.schedule.max_seconds
    if not budget:
        return None
    if run.warmup_elapsed is None:
        if run.step < run.cfg.schedule.warmup_steps and run.elapsed < WARMUP_MAX_BUDGET_FRACTION * budget:
            return 0.0
        run.warmup_elapsed = run.elapsed
    return (run.elapsed - run.warmup_elapsed) / max(budget - run.warmup_elapsed, 1e-9)


def optimizer_step(run: Run) -> None:
    """One optimizer step: the LR from the schedule, `grad_accum` micro-batches, clip, step.

    The step's loss is the mean over every trained (non-ignored) target token of all its micro-batches and all
    ranks, not a mean of per-micro-batch means: a masked SFT micro-batch with few answer tokens weighs what its
    tokens weigh, so the train loss is the same quantity as the validation loss. Each micro-batch's mean loss is
    scaled by its share of the step's tokens (times the world size, since DDP/FSDP average gradients over ranks)."""
    cfg, rt, opt = run.cfg, run.rt, run.optimizer
    accum = cfg.optimizer.grad_accum
    progress = budget_progress(run)  # sets warmup_elapsed when warm-up ends on the clock
    mult = lr_multiplier(run.step, run.steps, cfg.schedule, progress, warmup_over=run.warmup_elapsed is not None)
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * mult
    batches = [run.train_source.next_batch() for _ in range(accum)]
    # counted on the host batches (numpy), before they move: no device sync
    counts = [int(np.count_nonzero(b["targets"].numpy() != IGNORE_INDEX)) for b in batches]
    total = sum(counts)
    if rt.distributed:
        t = torch.tensor([total], dtype=torch.long, device=rt.device)
        torch.distributed.all_reduce(t)
        total = int(t)
    if not total:
        raise JojoError(f"step {run.step + 1} has no trained target tokens in any micro-batch; check the data")
    if run.loss_sum is None:
        run.loss_sum = torch.zeros((), device=rt.device)
    for micro, (batch, n) in enumerate(zip(batches, counts)):
        batch = batch_to_device(batch, rt.device)  # pinned, non-blocking on CUDA
        x, y = batch["input_ids"], batch["targets"]
        kwargs = {"doc_ids": batch["doc_ids"]} if "doc_ids" in batch else {}
        sync = micro == accum - 1
        ctx = contextlib.nullcontext()
        if rt.fsdp:
            run.model.set_requires_gradient_sync(sync)  # reduce-scatter gradients on the last micro-step only
        elif rt.distributed and not sync:
            ctx = run.train_model.no_sync()
        with ctx, rt.autocast():
            loss = run.train_model(x, y, **kwargs)[1]  # not kept: the [B, T, V] logits would live through backward
            scaled = loss * (n * rt.world_size / total)
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        run.loss_sum += loss.detach() * n
    run.loss_tokens += total  # all ranks' tokens; log_progress sums the ranks' loss_sum to match
    if run.scaler:
        for o in opt.optimizers:
            run.scaler.unscale_(o)  # true gradients for clipping; scaler.step skips a step with inf/nan
    if cfg.optimizer.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optimizer.grad_clip)
    if run.scaler:
        for o in opt.optimizers:
            run.scaler.step(o)
        run.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    run.tok_window += run.tokens_per_step


def log_progress(run: Run, elapsed: float) -> None:
    """The train loss since the last log line (per trained token), tokens/s, MFU; metrics.jsonl and the bar.
    `float()` is a device sync point: it happens only here, at log intervals."""
    loss_sum = run.loss_sum
    if run.rt.distributed:
        torch.distributed.all_reduce(loss_sum)
    run.train_loss = float(loss_sum) / max(run.loss_tokens, 1)
    run.loss_sum, run.loss_tokens = None, 0
    if not math.isfinite(run.train_loss):
        raise JojoError(f"training diverged at step {run.step} (loss {run.train_loss}); lower --learning-rate")
    now = time.time()
    tps = run.tok_window / max(now - run.t_window, 1e-9)
    run.t_window, run.tok_window = now, 0
    lr = run.optimizer.param_groups[-1]["lr"]
    peak = peak_flops(run.rt.device, run.rt.dtype)
    mfu = run.model.flops_per_token() * tps / run.rt.world_size / peak if peak else None
    if run.monitor:
        run.monitor.log("train", run.step, loss=run.train_loss, lr=lr, tokens_per_second=tps, mfu=mfu,
                        tokens_seen=run.tokens_seen, elapsed=elapsed)  # fmt: skip
    post = {"loss": f"{run.train_loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"}
    if mfu is not None:
        post["mfu"] = f"{100 * mfu:.1f}%"
    if run.bar:
        run.bar.set_postfix(post, refresh=False)
    elif run.plain_log:
        of = "" if run.steps == UNBOUNDED else f"/{run.steps}"
        print(f"step {run.step}{of}: " + ", ".join(f"{k} {v}" for k, v in post.items()), file=sys.stderr, flush=True)


def evaluate_and_save(run: Run) -> bool:
    """Validation loss and bits per byte, a checkpoint (best when it improved), the loss plot. Returns whether
    the run should stop early (`logging.patience` evaluations without a better validation loss)."""
    log, rt = run.cfg.logging, run.rt
    run.val_loss, _ = evaluate_loss(run.model, run.val_source, rt.device, rt.validation_dtype, log.eval_iters)
    run.val_bpb = run.val_loss / LN2 / run.bytes_per_token if run.bytes_per_token else None
    tasks = _task_metrics(run) if log.eval_tasks else {}  # every rank: under FSDP a forward is collective
    if run.monitor:
        row = {"val_loss": run.val_loss, "val_bpb": run.val_bpb, **tasks}
        if run.entropy_floor_bpb and run.bytes_per_token:
            row["entropy_floor_bpb"] = run.entropy_floor_bpb
            row["entropy_floor_loss"] = run.entropy_floor_bpb * LN2 * run.bytes_per_token
        run.monitor.log("eval", run.step, **row)
        if run.monitor.wants_sample and not rt.fsdp:  # FSDP's forward is collective: no rank-0-only decoding
            run.monitor.sample(run.step, run.model, run.tokenizer)
    is_best = run.val_loss < run.best_val
    run.best_val = min(run.best_val, run.val_loss)
    run.evals_without_gain = 0 if is_best else run.evals_without_gain + 1
    save(run, run.val_loss, is_best)  # a save with every evaluation
    if run.monitor:
        run.monitor.plot()
    # every rank computes the same val loss, so all stop together
    return bool(log.patience and run.evals_without_gain >= log.patience)


def _task_metrics(run: Run) -> dict[str, float]:
    """`logging.eval_tasks` (zero-shot benchmarks, `jojo.eval.tasks`) on the model as it is: {"hellaswag/acc": ...}."""
    from jojo.eval.tasks import flat_metrics, run_tasks

    log = run.cfg.logging
    tasks = [t.strip() for t in log.eval_tasks.split(",") if t.strip()]
    results = run_tasks(run.model, run.tokenizer, tasks, data_dir=log.eval_data_dir or None, limit=log.eval_limit,
                        device=run.rt.device, dtype=run.rt.validation_dtype)  # fmt: skip
    return {k: v for k, v in flat_metrics(results).items() if not k.endswith("_stderr")}


def save(run: Run, val_loss: float | None, is_best: bool) -> None:
    """Write a checkpoint (rank 0; under FSDP every rank first takes part in gathering the full state)."""
    rt = run.rt
    if rt.fsdp:  # gathering the full weights and optimizer state is a collective: every rank takes part
        weights, opt_sd = _gather_fsdp(run.model, run.optimizer)
    else:
        weights, opt_sd = None, None
    if not rt.is_main:
        return
    state = {
        "best_val_loss": run.best_val if run.best_val < math.inf else None,
        "val_loss": val_loss,
        "tokens_seen": run.tokens_seen,
        "elapsed": run.elapsed,
        "warmup_elapsed": run.warmup_elapsed,
        "data": run.train_source.state_dict(),
        "run_config": run.cfg.to_dict(),
        **(run.extra_state or {}),
    }
    opt_state = {"optimizer": opt_sd or run.optimizer.state_dict(), "rng_cpu": torch.get_rng_state()}
    if rt.device.type == "cuda":
        opt_state["rng_cuda"] = torch.cuda.get_rng_state(rt.device)
    if run.scaler is not None:
        opt_state["scaler"] = run.scaler.state_dict()
    if run.state_dict_fn:
        weights = run.state_dict_fn()
    ckpt_io.write_checkpoint(Path(run.cfg.logging.out_dir), run.step, run.model, run.tokenizer, state, opt_state,
                             run.cfg.logging.keep_last, best=is_best, weights=weights)  # fmt: skip


def finish(run: Run, wall: float, interrupted: bool, stopped_early: bool) -> FitResult:
    if run.bar:
        run.bar.close()
    if run.monitor:
        run.monitor.log("end", run.step, wall_seconds=wall, interrupted=interrupted, stopped_early=stopped_early)
        run.monitor.close()
    done_tokens = run.tokens_seen - run.start_step * run.tokens_per_step
    return FitResult(
        run_dir=Path(run.cfg.logging.out_dir),
        step=run.step,
        train_loss=run.train_loss,
        val_loss=run.val_loss,
        val_bpb=run.val_bpb,
        best_val_loss=run.best_val if run.best_val < math.inf else None,
        tokens_per_second=done_tokens / max(wall, 1e-9),
        tokens_seen=run.tokens_seen,
        wall_seconds=wall,
        stopped_early=stopped_early,
        interrupted=interrupted,
    )


def _gather_fsdp(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) weights and optimizer state on CPU, for a checkpoint that loads without FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    _, opt_sd = get_state_dict(model, optimizer.optimizers, options=opts)
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)  # stored once, as the embedding (see checkpoint.unique_state_dict)
    return {k: v.contiguous() for k, v in weights.items()}, {"fsdp_full": opt_sd}


def _load_optimizer(model: torch.nn.Module, optimizer, saved: dict, rt: Runtime) -> None:
    if "fsdp_full" in saved:
        if not rt.fsdp:
            raise JojoError("this checkpoint's optimizer state was saved under --system.fsdp; resume with it")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_optimizer_state_dict(model, optimizer.optimizers, saved["fsdp_full"], options=opts)
    elif rt.fsdp:
        raise JojoError("this checkpoint was saved without --system.fsdp; resume it without FSDP")
    else:
        optimizer.load_state_dict(saved)


def _read_state(path: Path) -> dict:
    import json

    return json.loads((ckpt_io.resolve_checkpoint(path) / ckpt_io.STATE).read_text())
