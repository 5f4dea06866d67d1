"""`jojo train`: set up runtime, data, tokenizer and model from one TrainConfig, then call `fit` (or, with
`--dry-run`, report sizes, FLOPs, memory and budget without training)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from jojo import checkpoint as ckpt_io
from jojo.config import ModelConfig, TrainConfig, model_config_from_dict
from jojo.data.loader import BatchLoader
from jojo.data.prepare import load_meta
from jojo.device import available_memory
from jojo.errors import JojoError
from jojo.model import GPT
from jojo.tokenizer import Tokenizer
from jojo.train.lock import RunLock
from jojo.train.loop import FitResult, fit, total_steps
from jojo.train.system import (
    Runtime,
    activation_bytes,
    cuda_fits,
    fit_micro_batch,
    optimizer_state_bytes,
    plan_batch,
    probe_reserve,
    seed_everything,
    setup_runtime,
    teardown_runtime,
)


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up so the embedding and head matrices have GPU-friendly shapes."""
    return multiple * math.ceil(n / multiple)


def resolve_model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> TrainConfig:
    """The model's vocabulary must hold every token id; size it from the tokenizer unless set larger."""
    need = tokenizer.vocab_size
    if cfg.model.vocab_size < need or cfg.model.vocab_size > 4 * padded_vocab(need) + 1024:
        model = dataclasses.replace(cfg.model, vocab_size=padded_vocab(need))
        cfg = dataclasses.replace(cfg, model=model)
    return cfg


def build_loaders(cfg: TrainConfig, rt: Runtime, block_size: int) -> tuple[BatchLoader, BatchLoader]:
    if not cfg.data.dataset:
        raise JojoError("no dataset: pass --dataset DIR (a folder made by `jojo prepare`)")
    common = dict(batch_size=cfg.data.batch_size, block_size=block_size, seed=cfg.system.seed)
    train = BatchLoader(
        cfg.data.dataset, "train", rank=rt.rank, world_size=rt.world_size, doc_aligned=cfg.data.doc_aligned, **common
    )
    val = BatchLoader(cfg.data.dataset, "val", shuffle=False, evaluation=True, **common)
    return train, val


def resolve_batch(cfg: TrainConfig, rt: Runtime, model: GPT) -> TrainConfig:
    """Fix the micro-batch and grad_accum: `--batch-size auto` searches the largest micro-batch that fits on the
    GPU; `data.global_batch` (rows per optimizer step, all ranks) sets grad_accum to keep it exact."""
    data, opt = cfg.data, cfg.optimizer
    micro, accum = data.batch_size, opt.grad_accum
    if micro == 0:
        if rt.device.type != "cuda":
            raise JojoError(
                f"--batch-size auto probes GPU memory and needs a CUDA device (this run is on {rt.device.type}); "
                "give a number, e.g. --batch-size 8"
            )
        global_rows = data.global_batch or 0
        limit = max(global_rows // rt.world_size, 1) if global_rows else 1024
        reserve = probe_reserve(model, rt, opt.name, torch.cuda.get_device_properties(rt.device).total_memory)
        fits = cuda_fits(model, rt, model.config.block_size, model.config.vocab_size, reserve)
        micro = fit_micro_batch(fits, limit)
        if micro == 0:
            raise JojoError("not even a micro-batch of 1 row fits in GPU memory; use a smaller model or block_size")
        if not global_rows:
            global_rows = micro * accum * rt.world_size  # keep the configured grad_accum
        if rt.is_main:
            print(f"batch-size auto: {micro} rows fit per micro-batch on {rt.device}")
    elif data.global_batch:
        global_rows = data.global_batch
    else:
        return cfg
    if data.batch_size and global_rows % (micro * rt.world_size):  # a number the user chose: say what fails
        raise JojoError(
            f"data.global_batch ({global_rows}) must be a multiple of data.batch_size ({micro}) x processes "
            f"({rt.world_size})"
        )
    micro, accum = plan_batch(micro, global_rows, rt.world_size)
    if rt.is_main and (micro, accum) != (data.batch_size, opt.grad_accum):
        print(f"batch: {micro} rows x {accum} accumulation x {rt.world_size} process(es) = {global_rows} rows/step")
    return dataclasses.replace(
        cfg, data=dataclasses.replace(data, batch_size=micro), optimizer=dataclasses.replace(opt, grad_accum=accum)
    )


def memory_estimate(cfg: TrainConfig, model: GPT, rt: Runtime) -> dict[str, float]:
    """Bytes of training memory per process, by the usual accounting (float32 master weights):

        weights     4 P                       (P parameters, each shared tensor once)
        gradients   4 P
        optimizer   AdamW: 8 P (exp_avg, exp_avg_sq); Muon: 4 P_hidden (momentum) + 8 P_rest
        buffers     the model's registered buffers as allocated (Llama's RoPE tables: 2 * T * head_dim * 4)
        activations `system.activation_bytes` (per layer ~34-56 bytes x C per token in bf16, plus 12 V bytes per
                    token around the loss) + 2 bytes per matmul weight under 16-bit autocast (its cast copies)

    Under FSDP the first three are divided by the number of processes. Allocator slack and temporary buffers
    come on top (budget ~10-20%). This is the eager figure; a compiled step usually needs less."""
    c = model.config
    P = model.num_params()
    shard = rt.world_size if rt.fsdp else 1
    B = max(cfg.data.batch_size, 1)
    casts = 0
    if rt.dtype in (torch.bfloat16, torch.float16):
        casts = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    est = {
        "weights": 4 * P / shard,
        "gradients": 4 * P / shard,
        "optimizer": optimizer_state_bytes(model, cfg.optimizer.name) / shard,
        "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
        "activations": activation_bytes(c, B, rt.dtype) + casts,
    }
    est["total"] = sum(est.values())
    return est


def dry_run(cfg: TrainConfig, init_from: str | None = None, out=print) -> dict:
    """Build model, data and optimizer as `jojo train` would; print parameters, FLOPs per token, the memory
    estimate and the token budget; train nothing and write nothing. Without a dataset, the model, FLOPs and
    memory come from the config alone (the model is built on the meta device: nothing allocated)."""
    rt = setup_runtime(cfg.system)
    try:
        meta = None
        if cfg.data.dataset:
            tokenizer, meta = _load_data(cfg)
        if init_from:
            model, _, _ = ckpt_io.load_checkpoint(init_from, rt.device)
            cfg = dataclasses.replace(cfg, model=model.config)
        elif meta is not None:
            cfg = resolve_model_config(cfg, tokenizer)
            check_context(cfg, meta)  # before allocating: a context longer than the data has no rows
            model = GPT(cfg.model).to(rt.device)
        else:
            with torch.device("meta"):
                model = GPT(cfg.model)
        if cfg.data.batch_size == 0 and rt.device.type != "cuda" or (meta is None and cfg.data.batch_size == 0):
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=1))
            out("note: --batch-size auto searches GPU memory when training; the figures below assume 1 row")
        elif cfg.data.batch_size == 0 or cfg.data.global_batch:
            cfg = resolve_batch(cfg, rt, model)
        report = _dry_run_report(cfg, model, rt, meta, out)
        out("dry run: nothing trained, nothing written")
        return report
    finally:
        teardown_runtime(rt)


def _dry_run_report(cfg: TrainConfig, model: GPT, rt: Runtime, meta: dict | None, out) -> dict:
    c = model.config
    tokens_per_step = cfg.data.batch_size * cfg.optimizer.grad_accum * rt.world_size * c.block_size
    flops_tok = model.flops_per_token()
    mem = memory_estimate(cfg, model, rt)
    report = {
        "parameters": model.num_params(),
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "flops_per_token": flops_tok,
        "tokens_per_step": tokens_per_step,
        "memory": mem,
        "optimizer": cfg.optimizer.name,
    }
    gib = 2**30
    out(f"model: {c.family}, {c.n_layer} layers x {c.n_embd}, {c.n_head} heads, context {c.block_size}, "
        f"vocab {c.vocab_size}")  # fmt: skip
    out(f"parameters: {report['parameters']:,} ({report['non_embedding_parameters']:,} without embeddings)")
    out(f"FLOPs per token (training, 6N + 12 L C T): {flops_tok / 1e6:,.1f} M")
    out(f"device: {rt.device}, autocast {str(rt.dtype).replace('torch.', '')}, {rt.world_size} process(es)"
        f"{', FSDP' if rt.fsdp else ''}; optimizer {cfg.optimizer.name}")  # fmt: skip
    out(f"batch: {cfg.data.batch_size} rows x {cfg.optimizer.grad_accum} accumulation x {rt.world_size} "
        f"process(es) x {c.block_size} tokens = {tokens_per_step:,} tokens/step")  # fmt: skip
    if meta is not None:
        train_src, _ = build_loaders(cfg, rt, c.block_size)
        steps = total_steps(cfg, max(train_src.steps_per_epoch // cfg.optimizer.grad_accum, 1), tokens_per_step)
        train_tokens = meta["splits"]["train"]["tokens"]
        report.update(steps=steps, tokens=steps * tokens_per_step, total_flops=flops_tok * steps * tokens_per_step,
                      epochs=steps * tokens_per_step / max(train_tokens, 1))  # fmt: skip
        if cfg.schedule.max_seconds:
            out(f"budget: {cfg.schedule.max_seconds:,.0f} seconds (the run ends at the deadline)")
        else:
            out(f"budget: {steps:,} steps = {report['tokens']:,} tokens = {report['epochs']:.2f} epochs of "
                f"{train_tokens:,} training tokens; whole run {report['total_flops']:.3e} FLOPs")  # fmt: skip
    else:
        out("data: no --dataset given; the token budget and epochs need one (the model figures above do not)")
    out("memory per process (estimate): " + ", ".join(f"{k} {v / gib:.3f} GiB" for k, v in mem.items()))
    available = available_memory(rt.device)
    if available is not None:
        verdict = "fits" if mem["total"] <= available else "does not fit: training would refuse it (--force)"
        out(f"memory available on {rt.device}: {available / gib:.3f} GiB; the estimate {verdict}")
    out("  = 4P weights + 4P grads + 8P AdamW (Muon: 4 per hidden-matrix param) "
        "+ activations (per layer and token ~34-56 x C bytes in bf16, + 12 V around the loss)")  # fmt: skip
    return report


def _load_data(cfg: TrainConfig) -> tuple[Tokenizer, dict]:
    meta = load_meta(cfg.data.dataset) if cfg.data.dataset else None
    if meta is None:
        raise JojoError("no dataset: pass --dataset DIR (a folder made by `jojo prepare`)")
    tokenizer = Tokenizer.load(Path(cfg.data.dataset))
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise JojoError(f"{cfg.data.dataset}/tokenizer.json does not match its shards; re-run `jojo prepare`")
    return tokenizer, meta


def run_training(
    cfg: TrainConfig,
    resume: bool = False,
    init_from: str | None = None,
    quiet: bool = False,
    overrides: dict | None = None,
) -> FitResult:
    """overrides: the command line's override tree (config.parse_overrides): a resumed or --init-from run refuses
    an explicit model.* value that differs from its checkpoint's, and a resume lists what it honours."""
    rt = setup_runtime(cfg.system)
    lock = RunLock(cfg.logging.out_dir)
    try:
        lock.acquire()  # one writer per run directory, before anything is written into it
        tokenizer, meta = _load_data(cfg)
        run_dir = Path(cfg.logging.out_dir)
        resume_from = None
        model = None
        if resume:
            if not (run_dir / "latest").exists():
                raise JojoError(f"nothing to resume in {run_dir}: no 'latest' checkpoint; drop --resume to start fresh")
            resume_from = ckpt_io.resolve_checkpoint(run_dir)
            model, ck_tok, state = ckpt_io.load_checkpoint(resume_from, rt.device)
            _check_same_tokenizer(ck_tok, tokenizer, resume_from, cfg.data.dataset)
            ck_model = model_config_from_dict(state["run_config"]["model"])
            keep_architecture(overrides, cfg.model, ck_model, resume_from, resume=True)
            if rt.is_main and not quiet:
                print(resume_line(cfg, state, overrides, resume_from))
            cfg = dataclasses.replace(cfg, model=ck_model)
        elif init_from:
            model, ck_tok, _ = ckpt_io.load_checkpoint(init_from, rt.device)
            _check_same_tokenizer(ck_tok, tokenizer, init_from, cfg.data.dataset)
            keep_architecture(overrides, cfg.model, model.config, init_from, resume=False)
            cfg = dataclasses.replace(cfg, model=model.config)
        else:
            if (run_dir / "latest").exists():
                raise JojoError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
            cfg = resolve_model_config(cfg, tokenizer)
            check_fits(cfg, rt, meta)  # before allocating: a context longer than the data, or too big to fit
            seed_everything(cfg.system.seed)  # the same initial weights for the same seed, on every rank
            model = GPT(cfg.model).to(rt.device)
        if resume or init_from:
            check_fits(cfg, rt, meta, loaded=model)
        model.train()
        cfg = resolve_batch(cfg, rt, model)
        train_src, val_src = build_loaders(cfg, rt, model.config.block_size)
        val_info = meta["splits"]["val"]
        bytes_per_token = val_info["bytes"] / val_info["tokens"] if val_info["tokens"] else None
        return fit(
            cfg,
            model,
            tokenizer,
            train_src,
            val_src,
            rt,
            bytes_per_token=bytes_per_token,
            entropy_floor_bpb=val_info.get("entropy_floor_bpb"),
            resume_from=resume_from,
            quiet=quiet,
        )
    finally:
        lock.release()
        teardown_runtime(rt)


def _check_same_tokenizer(ck_tok: Tokenizer, data_tok: Tokenizer, ckpt, dataset) -> None:
    if ck_tok.hash != data_tok.hash:
        raise JojoError(
            f"checkpoint {ckpt} was trained with another tokenizer than the one {dataset} was prepared with "
            f"({ck_tok.hash} != {data_tok.hash}); re-run `jojo prepare` with the checkpoint's tokenizer.json"
        )


# ---- start-up checks: what cannot fit, and what a checkpoint fixes --------------------------------------
def check_fits(cfg: TrainConfig, rt: Runtime, meta: dict | None, loaded: GPT | None = None) -> None:
    """Refuse, before allocating anything, a run that cannot work: a context longer than a split of the data
    (`check_context`), or a dry-run memory estimate above what the device has available (`check_memory`)."""
    if meta:
        check_context(cfg, meta)
    check_memory(cfg, rt, loaded)


def check_context(cfg: TrainConfig, meta: dict) -> None:
    """A row is block_size + 1 tokens of one split: a context longer than a split has no row at all."""
    T = cfg.model.block_size
    for split in ("train", "val"):
        tokens = meta["splits"][split]["tokens"]
        if tokens < T + 1:
            raise JojoError(
                f"model.block_size ({T:,}) is longer than the '{split}' split of {cfg.data.dataset} ({tokens:,} "
                "tokens; a row needs block_size + 1); lower --block-size or prepare more data"
            )


def check_memory(cfg: TrainConfig, rt: Runtime, loaded: GPT | None = None) -> None:
    """Refuse a run whose `memory_estimate` exceeds the memory the device has available now; `--force`
    (system.force) skips this. The estimate leaves out allocator slack, so a refusal is never a close call.

    loaded: the model when it is already in memory (resume, --init-from): its parameters count as available."""
    T = cfg.model.block_size
    if cfg.system.force or cfg.data.batch_size == 0:  # auto: the batch search measures what fits
        return
    available = available_memory(rt.device)
    if available is None:
        return
    if loaded is not None:
        available += sum(p.numel() * p.element_size() for p in loaded.parameters())
        probe = loaded
    else:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            probe = GPT(cfg.model)
    micro = cfg.data.batch_size
    if cfg.data.global_batch:
        micro, _ = plan_batch(micro, cfg.data.global_batch, rt.world_size)
    need = memory_estimate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=micro)), probe, rt)
    if need["total"] > available:
        gib = 2**30
        parts = ", ".join(f"{k} {v / gib:,.1f}" for k, v in need.items() if k != "total")
        c = cfg.model
        raise JojoError(
            f"this run needs about {need['total'] / gib:,.1f} GiB per process ({parts} GiB) but {rt.device} has "
            f"{available / gib:,.1f} GiB available; reduce --batch-size ({micro}), model.block_size ({T:,}) or "
            f"the model (model.n_layer {c.n_layer}, model.n_embd {c.n_embd}), or pass --force to try anyway"
        )


def keep_architecture(overrides: dict | None, asked: ModelConfig, saved: ModelConfig, ckpt, resume: bool) -> None:
    """A model built from a checkpoint has the checkpoint's architecture: an explicit model.* override that
    differs from it is refused (it would otherwise be ignored without a word)."""
    for key in sorted((overrides or {}).get("model", {})):
        mine, theirs = getattr(asked, key, None), getattr(saved, key, None)
        if mine != theirs:
            how = "a resumed run keeps" if resume else "--init-from takes"
            fix = "start a new run (another --out)" if resume else "train from scratch instead"
            raise JojoError(
                f"{how} the architecture of {ckpt}: model.{key} is {theirs!r} there, not {mine!r}; drop "
                f"--model.{key}, or {fix}"
            )


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_line(cfg: TrainConfig, state: dict, overrides: dict | None, ckpt) -> str:
    """One line at the start of a resume: the checkpoint, its kept architecture, the command line's overrides
    (everything but the architecture is honoured), and any other setting that differs from the saved run
    (it comes from --config: a resume does not reread the run's own config)."""
    m = model_config_from_dict(state["run_config"]["model"])
    given = {k: v for k, v in _flatten(overrides or {}).items() if not k.startswith("model.")}
    given.pop("logging.out_dir", None)
    saved = {k: v for k, v in _flatten(state["run_config"]).items() if not k.startswith("model.")}
    now = _flatten(cfg.to_dict())
    differ = [
        f"{k} {saved[k]} -> {now[k]}" for k in sorted(saved) if k in now and now[k] != saved[k] and k not in given
    ]
    line = (
        f"resuming {ckpt} at step {state['step']}: architecture kept ({m.family}, {m.n_layer} layers x {m.n_embd}, "
        f"context {m.block_size}); overrides: {', '.join(f'{k}={v}' for k, v in given.items()) or 'none'}"
    )
    if differ:
        line += f"; also differs from the saved run: {', '.join(differ)}"
    return line
