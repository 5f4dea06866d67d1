"""`jojo train`: set up runtime, data, tokenizer and model from one TrainConfig, then call `fit` (or, with
`--dry-run`, report sizes, FLOPs, memory and budget without training)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from jojo import checkpoint as ckpt_io
from jojo.config import TrainConfig, model_config_from_dict
from jojo.data.loader import BatchLoader
from jojo.data.prepare import load_meta
from jojo.errors import JojoError
from jojo.model import GPT
from jojo.tokenizer import Tokenizer
from jojo.train.loop import FitResult, fit, total_steps
from jojo.train.optim import build_optimizer
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
        "activations": activation_bytes(c, B, rt.dtype) + casts,
    }
    est["total"] = sum(est.values())
    return est


def dry_run(cfg: TrainConfig, init_from: str | None = None, out=print) -> dict:
    """Build model, data and optimizer as `jojo train` would; print parameters, FLOPs per token, the memory
    estimate and the token budget; train nothing and write nothing."""
    rt = setup_runtime(cfg.system)
    try:
        tokenizer, meta = _load_data(cfg)
        if init_from:
            model, _, _ = ckpt_io.load_checkpoint(init_from, rt.device)
            cfg = dataclasses.replace(cfg, model=model.config)
        else:
            cfg = resolve_model_config(cfg, tokenizer)
            model = GPT(cfg.model).to(rt.device)
        if cfg.data.batch_size == 0 and rt.device.type != "cuda":
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=1))
            out("note: --batch-size auto searches GPU memory when training; the figures below assume 1 row")
        elif cfg.data.batch_size == 0 or cfg.data.global_batch:
            cfg = resolve_batch(cfg, rt, model)
        train_src, _ = build_loaders(cfg, rt, model.config.block_size)
        optimizer = build_optimizer(model, cfg.optimizer, rt.device.type)
        c = model.config
        rows = cfg.data.batch_size * cfg.optimizer.grad_accum * rt.world_size
        tokens_per_step = rows * c.block_size
        steps = total_steps(cfg, max(train_src.steps_per_epoch // cfg.optimizer.grad_accum, 1), tokens_per_step)
        train_tokens = meta["splits"]["train"]["tokens"]
        flops_tok = model.flops_per_token()
        mem = memory_estimate(cfg, model, rt)
        report = {
            "parameters": model.num_params(),
            "non_embedding_parameters": model.num_params(non_embedding=True),
            "flops_per_token": flops_tok,
            "tokens_per_step": tokens_per_step,
            "steps": steps,
            "tokens": steps * tokens_per_step,
            "epochs": steps * tokens_per_step / max(train_tokens, 1),
            "total_flops": flops_tok * steps * tokens_per_step,
            "memory": mem,
            "optimizer": type(optimizer.optimizers[0]).__name__,
        }
        gib = 2**30
        out(
            f"model: {c.family}, {c.n_layer} layers x {c.n_embd}, {c.n_head} heads, context {c.block_size}, "
            f"vocab {c.vocab_size}"
        )
        out(f"parameters: {report['parameters']:,} ({report['non_embedding_parameters']:,} without embeddings)")
        out(
            f"FLOPs per token (training, 6N + 12 L C T): {flops_tok / 1e6:,.1f} M; "
            f"whole run: {report['total_flops']:.3e}"
        )
        out(
            f"device: {rt.device}, autocast {str(rt.dtype).replace('torch.', '')}, {rt.world_size} process(es)"
            f"{', FSDP' if rt.fsdp else ''}; optimizer {cfg.optimizer.name}"
        )
        out(
            f"batch: {cfg.data.batch_size} rows x {cfg.optimizer.grad_accum} accumulation x {rt.world_size} "
            f"process(es) x {c.block_size} tokens = {tokens_per_step:,} tokens/step"
        )
        out(
            f"budget: {steps:,} steps = {report['tokens']:,} tokens = {report['epochs']:.2f} epochs of "
            f"{train_tokens:,} training tokens"
        )
        out("memory per process (estimate): " + ", ".join(f"{k} {v / gib:.3f} GiB" for k, v in mem.items()))
        out(
            "  = 4P weights + 4P grads + 8P AdamW (Muon: 4 per hidden-matrix param) "
            "+ activations (per layer and token ~34-56 x C bytes in bf16, + 12 V around the loss)"
        )
        out("dry run: nothing trained, nothing written")
        return report
    finally:
        teardown_runtime(rt)


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
) -> FitResult:
    rt = setup_runtime(cfg.system)
    try:
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
            cfg = dataclasses.replace(cfg, model=model_config_from_dict(state["run_config"]["model"]))
        elif init_from:
            model, ck_tok, _ = ckpt_io.load_checkpoint(init_from, rt.device)
            _check_same_tokenizer(ck_tok, tokenizer, init_from, cfg.data.dataset)
            cfg = dataclasses.replace(cfg, model=model.config)
        else:
            if (run_dir / "latest").exists():
                raise JojoError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
            cfg = resolve_model_config(cfg, tokenizer)
            seed_everything(cfg.system.seed)  # the same initial weights for the same seed, on every rank
            model = GPT(cfg.model).to(rt.device)
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
        teardown_runtime(rt)


def _check_same_tokenizer(ck_tok: Tokenizer, data_tok: Tokenizer, ckpt, dataset) -> None:
    if ck_tok.hash != data_tok.hash:
        raise JojoError(
            f"checkpoint {ckpt} was trained with another tokenizer than the one {dataset} was prepared with "
            f"({ck_tok.hash} != {data_tok.hash}); re-run `jojo prepare` with the checkpoint's tokenizer.json"
        )
