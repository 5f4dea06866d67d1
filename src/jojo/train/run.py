"""`jojo train`: set up runtime, data, tokenizer and model from one TrainConfig, then call `fit`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from jojo.config import TrainConfig, model_config_from_dict
from jojo.data.loader import BatchLoader
from jojo.data.prepare import load_meta
from jojo.errors import JojoError
from jojo.model import GPT
from jojo.tokenizer import Tokenizer
from jojo.train import checkpoint as ckpt_io
from jojo.train.loop import FitResult, fit
from jojo.train.system import Runtime, setup_runtime, teardown_runtime


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
    val = BatchLoader(cfg.data.dataset, "val", shuffle=False, **common)
    return train, val


def run_training(
    cfg: TrainConfig,
    resume: bool = False,
    init_from: str | None = None,
    quiet: bool = False,
) -> FitResult:
    rt = setup_runtime(cfg.system)
    try:
        meta = load_meta(cfg.data.dataset) if cfg.data.dataset else None
        if meta is None:
            raise JojoError("no dataset: pass --dataset DIR (a folder made by `jojo prepare`)")
        tokenizer = Tokenizer.load(Path(cfg.data.dataset))
        if tokenizer.hash != meta["tokenizer_hash"]:
            raise JojoError(f"{cfg.data.dataset}/tokenizer.json does not match its shards; re-run `jojo prepare`")
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
            model = GPT(cfg.model).to(rt.device)
        model.train()
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
