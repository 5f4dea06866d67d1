"""The one training loop, for pretraining and fine-tuning alike.

A run is: a config, a model (fresh, `init_from` weights, or resumed), a training batch source and a
validation batch source. Pretraining reads prepared token shards; SFT passes its own sources (masked targets,
packed rows) through the same `fit`. Sources implement `next_batch() -> dict`, `state_dict()`,
`load_state_dict()`, `steps_per_epoch` and, for validation, `iter_sequential(max_batches)`.

Each step: set the LR from the schedule, run `grad_accum` micro-batches (DDP syncs gradients on the last
only), clip, step. Every `eval_interval` steps (and at the end): validation loss and bits per byte, a
checkpoint, the loss plot; with `logging.patience` the run stops early after that many evaluations without
a better validation loss. Ctrl+C or SIGTERM finishes the current step, saves, and exits cleanly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jojo import checkpoint as ckpt_io
from jojo.config import TrainConfig
from jojo.errors import JojoError
from jojo.eval.lm import LN2, evaluate_loss
from jojo.model import GPT
from jojo.tokenizer import Tokenizer
from jojo.train.optim import build_optimizer
from jojo.train.schedule import lr_multiplier
from jojo.train.system import Runtime, batch_to_device, peak_flops, seed_everything, wrap_for_training


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
    history: list[dict] = field(default_factory=list)


def total_steps(cfg: TrainConfig, steps_per_epoch: int, tokens_per_step: int) -> int:
    s = cfg.schedule
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
    from jojo.train.monitor import Monitor

    log = cfg.logging
    run_dir = Path(log.out_dir)
    seed_everything(cfg.system.seed + rt.rank)
    if rt.fsdp and cfg.optimizer.name == "muon":
        raise JojoError("optimizer.name=muon does not work with --system.fsdp (it needs whole matrices); use adamw")
    # Wrap first: FSDP2 turns the parameters into sharded DTensors, and the optimizer must hold those.
    train_model = wrap_for_training(model, rt, cfg.system.compile)
    optimizer = build_optimizer(model, cfg.optimizer, rt.device.type)
    scaler = rt.grad_scaler()
    micro_bs = cfg.data.batch_size
    tokens_per_step = micro_bs * model.config.block_size * cfg.optimizer.grad_accum * rt.world_size
    steps = total_steps(cfg, max(train_source.steps_per_epoch // cfg.optimizer.grad_accum, 1), tokens_per_step)

    start_step, best_val, tokens_seen = 0, math.inf, 0
    if resume_from is not None:
        state = ckpt_io.load_optimizer_state(resume_from)
        meta = _read_state(resume_from)
        if state is None:
            raise JojoError(
                f"checkpoint {resume_from} has no optimizer state; use --init-from to start from its weights"
            )
        _load_optimizer(model, optimizer, state["optimizer"], rt)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and "rng_cuda" in state and rt.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], rt.device)
        train_source.load_state_dict(meta["data"])
        start_step = meta["step"]
        best_val = meta.get("best_val_loss", math.inf) or math.inf
        tokens_seen = meta.get("tokens_seen", 0)
        if start_step >= steps:
            raise JojoError(
                f"the checkpoint is at step {start_step}, already at the budget of {steps} steps; "
                "raise --max-iters to train further"
            )

    monitor = Monitor(run_dir, cfg, resume=resume_from is not None) if rt.is_main else None
    if monitor and resume_from is None:
        cfg.save(run_dir / "run_config.json")
    flops_tok = model.flops_per_token()
    peak = peak_flops(rt.device, rt.dtype)
    bar = None
    if rt.is_main and log.progress and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start_step, desc="train", dynamic_ncols=True, leave=True)

    def save(step: int, val_loss: float | None, is_best: bool) -> None:
        if rt.fsdp:  # gathering the full weights and optimizer state is a collective: every rank takes part
            weights, opt_sd = _gather_fsdp(model, optimizer)
        else:
            weights, opt_sd = None, None
        if not rt.is_main:
            return
        state = {
            "best_val_loss": best_val if best_val < math.inf else None,
            "val_loss": val_loss,
            "tokens_seen": tokens_seen,
            "data": train_source.state_dict(),
            "run_config": cfg.to_dict(),
            **(extra_state or {}),
        }
        opt_state = {"optimizer": opt_sd or optimizer.state_dict(), "rng_cpu": torch.get_rng_state()}
        if rt.device.type == "cuda":
            opt_state["rng_cuda"] = torch.cuda.get_rng_state(rt.device)
        if scaler is not None:
            opt_state["scaler"] = scaler.state_dict()
        if state_dict_fn:
            weights = state_dict_fn()
        ckpt_io.write_checkpoint(
            run_dir, step, model, tokenizer, state, opt_state, log.keep_last, best=is_best, weights=weights
        )

    def run_eval(step: int) -> tuple[float, float | None]:
        val_loss, _ = evaluate_loss(model, val_source, rt.device, rt.dtype, log.eval_iters)
        val_bpb = val_loss / LN2 / bytes_per_token if bytes_per_token else None
        if monitor:
            row = {"val_loss": val_loss, "val_bpb": val_bpb}
            if entropy_floor_bpb and bytes_per_token:
                row["entropy_floor_bpb"] = entropy_floor_bpb
                row["entropy_floor_loss"] = entropy_floor_bpb * LN2 * bytes_per_token
            monitor.log("eval", step, **row)
            if monitor.wants_sample and not rt.fsdp:  # FSDP's forward is collective: no rank-0-only decoding
                monitor.sample(step, model, tokenizer)
        return val_loss, val_bpb

    model.train()
    t_start = time.time()
    t_last_save = t_start
    t_window, tok_window = time.time(), 0
    train_loss = val_loss = val_bpb = None
    tps = 0.0
    step = start_step
    stop = _StopFlag()
    interrupted = stopped_early = False
    evals_without_gain = 0
    with stop:
        while step < steps:
            mult = lr_multiplier(step, steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * mult
            loss_sum = torch.zeros((), device=rt.device)
            for micro in range(cfg.optimizer.grad_accum):
                batch = batch_to_device(train_source.next_batch(), rt.device)  # pinned, non-blocking on CUDA
                x, y = batch["input_ids"], batch["targets"]
                kwargs = {"doc_ids": batch["doc_ids"]} if "doc_ids" in batch else {}
                sync = micro == cfg.optimizer.grad_accum - 1
                ctx = contextlib.nullcontext()
                if rt.fsdp:
                    model.set_requires_gradient_sync(sync)  # reduce-scatter gradients on the last micro-step only
                elif rt.distributed and not sync:
                    ctx = train_model.no_sync()
                with ctx, rt.autocast():
                    loss = train_model(x, y, **kwargs)[1]  # not kept: the [B, T, V] logits would live through backward
                    loss = loss / cfg.optimizer.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if scaler:
                for opt in optimizer.optimizers:
                    scaler.unscale_(opt)  # true gradients for clipping; scaler.step skips a step with inf/nan
            if cfg.optimizer.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
            if scaler:
                for opt in optimizer.optimizers:
                    scaler.step(opt)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            tok_window += tokens_per_step

            if step % log.log_interval == 0 or step == steps:
                if rt.distributed:
                    torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
                train_loss = float(loss_sum)  # .item() is a device sync point: only at log intervals
                if not math.isfinite(train_loss):
                    raise JojoError(f"training diverged at step {step} (loss {train_loss}); lower --learning-rate")
                now = time.time()
                tps = tok_window / max(now - t_window, 1e-9)
                t_window, tok_window = now, 0
                lr = optimizer.param_groups[-1]["lr"]
                mfu = flops_tok * tps / rt.world_size / peak if peak else None
                if monitor:
                    monitor.log(
                        "train",
                        step,
                        loss=train_loss,
                        lr=lr,
                        tokens_per_second=tps,
                        mfu=mfu,
                        tokens_seen=tokens_seen,
                        elapsed=now - t_start,
                    )
                if bar:
                    post = {"loss": f"{train_loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"}
                    if mfu is not None:
                        post["mfu"] = f"{100 * mfu:.1f}%"
                    bar.set_postfix(post, refresh=False)
            if bar:
                bar.update(1)

            last = step == steps or stop.raised
            if step % log.eval_interval == 0 or last:
                val_loss, val_bpb = run_eval(step)
                is_best = val_loss < best_val
                best_val = min(best_val, val_loss)
                evals_without_gain = 0 if is_best else evals_without_gain + 1
                if log.patience and evals_without_gain >= log.patience and not last:
                    stopped_early = True  # every rank computes the same val loss, so all stop together
                save(step, val_loss, is_best)  # a save before (and with) every evaluation
                t_last_save = time.time()
                if monitor:
                    monitor.plot()
            elif (log.checkpoint_interval and step % log.checkpoint_interval == 0) or (
                log.checkpoint_minutes and time.time() - t_last_save >= 60 * log.checkpoint_minutes
            ):
                save(step, None, False)
                t_last_save = time.time()
            if stop.raised:
                interrupted = True
                break
            if stopped_early:
                if monitor:
                    monitor.log("early_stop", step, patience=log.patience, best_val_loss=best_val)
                break
    if bar:
        bar.close()
    wall = time.time() - t_start
    if monitor:
        monitor.log("end", step, wall_seconds=wall, interrupted=interrupted, stopped_early=stopped_early)
        monitor.close()
    done_tokens = tokens_seen - (start_step * tokens_per_step)
    return FitResult(
        run_dir=run_dir,
        step=step,
        train_loss=train_loss,
        val_loss=val_loss,
        val_bpb=val_bpb,
        best_val_loss=best_val if best_val < math.inf else None,
        tokens_per_second=done_tokens / max(wall, 1e-9),
        tokens_seen=tokens_seen,
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
