"""Checkpoints: self-describing directories that a crash never leaves half-written.

A checkpoint is a directory:

    model.safetensors   the weights (tied tensors stored once)
    config.json         the model config (architecture)
    tokenizer.json      the tokenizer the model was trained with
    state.json          step, metrics, tokenizer hash, run config, data position, RNG states
    optimizer.pt        optimizer and scheduler state (tensors only; loaded with weights_only=True)

A run directory holds numbered checkpoints `step-000100/` and two symbolic links, `latest` and `best`.
Writes go to a temporary directory that is fsynced, renamed into place, and only then does the link move
(itself via an atomic rename), so `latest` always points at a complete checkpoint, even after a kill -9
in the middle of a save. Wherever a command takes CKPT it also accepts a run directory (meaning `latest`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jojo.config import ModelConfig, model_config_from_dict
from jojo.errors import JojoError, annotate, ensure_dir, environment_error
from jojo.tokenizer import TOKENIZER_FILE, Tokenizer

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without duplicate entries for tied weights (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr(), tensor.shape
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    state: dict,
    optimizer_state: dict | None = None,
    keep_last: int = 2,
    best: bool = False,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write step-NNNNNN atomically, point `latest` (and `best` if asked) at it, prune old ones.
    `weights` replaces the model's own state dict (LoRA passes its merged weights).

    On any failure (a full disk, Ctrl+C, a bug) the temporary directory is removed and the exception re-raised;
    an environment failure (see jojo.errors) is raised as an OSError that names the checkpoint, the file being
    written and the last complete checkpoint, so the CLI can say all of it in one line."""
    run_dir = Path(run_dir)
    ensure_dir(run_dir)
    name = f"step-{step:06d}"
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    current = "the temporary directory"
    try:
        tmp.mkdir()
        current = WEIGHTS
        weights = unique_state_dict(model) if weights is None else weights
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        cfg: ModelConfig = model.config
        current = MODEL_CONFIG
        (tmp / MODEL_CONFIG).write_text(json.dumps(cfg.__dict__, indent=2) + "\n")
        current = TOKENIZER_FILE
        (tmp / TOKENIZER_FILE).write_text(tokenizer.to_json())
        current = STATE
        full_state = {"step": step, "tokenizer_hash": tokenizer.hash, "saved_at": time.time(), **state}
        (tmp / STATE).write_text(json.dumps(full_state, indent=2) + "\n")
        if optimizer_state is not None:
            current = OPTIMIZER
            # Through a Python file object: given a path, torch's own writer reports a full disk as "unexpected
            # pos" with no errno; given a file, the OSError survives as the RuntimeError's __context__.
            with open(tmp / OPTIMIZER, "wb") as fh:
                torch.save(optimizer_state, fh)
        current = "the files to disk (fsync)"
        _fsync_tree(tmp)
        current = "the rename into place"
        if final.exists():  # re-saving the same step (e.g. after an evaluation): replace it whole
            old = run_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
        current = "the links"
        _point(run_dir, "latest", name)
        if best:
            _point(run_dir, "best", name)
    except BaseException as exc:
        partial = tmp.exists()
        shutil.rmtree(tmp, ignore_errors=True)
        err = environment_error(exc)
        if err is None:
            raise
        if err is not exc:  # a library's wrapper: raise the OSError itself, chained to what the library said
            err = OSError(err.errno, err.strerror, err.filename)
        removed = "the partial checkpoint was removed; " if partial else ""
        annotate(
            err,
            doing=f"writing checkpoint {name} ({current})",
            path=run_dir,
            after=removed + last_complete(run_dir),
        )
        if err is exc:
            raise
        raise err from exc
    _prune(run_dir, keep_last)
    return final


def last_complete(run_dir: str | Path) -> str:
    """'the last complete checkpoint is R/step-N' (what `latest` points at), for messages after a failure."""
    link = Path(run_dir) / "latest"
    if link.is_symlink() and (link / WEIGHTS).is_file():
        return f"the last complete checkpoint is {Path(run_dir) / os.readlink(link)} (--resume continues from it)"
    return "no checkpoint of this run is complete yet"


def _point(run_dir: Path, link: str, target: str) -> None:
    tmp = run_dir / f".{link}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, run_dir / link)
    _fsync_dir(run_dir)


def _prune(run_dir: Path, keep_last: int) -> None:
    keep = {os.readlink(run_dir / ln) for ln in ("latest", "best") if (run_dir / ln).is_symlink()}
    steps = sorted(p.name for p in run_dir.glob("step-*") if p.is_dir())
    keep.update(steps[-keep_last:])
    for name in steps:
        if name not in keep:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    # Left by a killed save (the run-directory lock of jojo.train.lock makes sure no other writer owns them).
    for stale in [*run_dir.glob(".tmp-step-*"), *run_dir.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for link in [*run_dir.glob(".latest.tmp-*"), *run_dir.glob(".best.tmp-*")]:
        link.unlink(missing_ok=True)


_NOTED: set[Path] = set()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (-> its latest checkpoint), or a quickstart folder (-> its chat
    model, sft/, else its base model, model/; which one is said once on stderr)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    if (path / "latest" / WEIGHTS).is_file():
        return (path / "latest").resolve()
    for sub, what in (("sft", "chat model"), ("model", "pretrained model")):
        if (path / sub / "latest" / WEIGHTS).is_file():
            if path / sub not in _NOTED:
                _NOTED.add(path / sub)
                print(f"jojo: {path} holds runs; using {path / sub} (the {what})", file=sys.stderr)
            return (path / sub / "latest").resolve()
    if not path.exists():
        raise JojoError(f"checkpoint not found: {path}; pass a checkpoint directory or a run directory")
    raise JojoError(f"{path} holds no {WEIGHTS} and no 'latest' checkpoint; is it a Jojo run or checkpoint directory?")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """-> (model, tokenizer, state). The model is in eval mode on `device`; checks the tokenizer matches."""
    from jojo.model import GPT

    ckpt = resolve_checkpoint(path)
    try:
        cfg_dict = json.loads((ckpt / MODEL_CONFIG).read_text())
        state = json.loads((ckpt / STATE).read_text()) if (ckpt / STATE).is_file() else {}
    except FileNotFoundError:
        raise JojoError(f"checkpoint {ckpt} lacks {MODEL_CONFIG}; it is incomplete") from None
    except json.JSONDecodeError:
        raise JojoError(f"checkpoint {ckpt} has a corrupt JSON file; use another checkpoint") from None
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise JojoError(f"checkpoint {ckpt} has no {TOKENIZER_FILE}; copy the tokenizer it was trained with into it")
    tokenizer = Tokenizer.load(ckpt / TOKENIZER_FILE)
    if state.get("tokenizer_hash") and state["tokenizer_hash"] != tokenizer.hash:
        raise JojoError(
            f"the tokenizer in {ckpt} is not the one this model was trained with (hash {tokenizer.hash} != "
            f"{state['tokenizer_hash']}); restore the original tokenizer.json"
        )
    cfg = model_config_from_dict(cfg_dict)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise JojoError(
            f"the tokenizer in {ckpt} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
            "it comes from another tokenizer"
        )
    model = GPT(cfg)
    try:
        weights = load_file(str(ckpt / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise JojoError(f"cannot read {ckpt / WEIGHTS}: {exc}; the file is corrupt") from None
    load_weights(model, weights, str(ckpt))
    model.to(device).eval()
    return model, tokenizer, state


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str = "") -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights are stored once: the head aliases the embedding.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise JojoError(
            f"weights in {where} do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_optimizer_state(path: str | Path) -> dict | None:
    f = resolve_checkpoint(path) / OPTIMIZER
    if not f.is_file():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise JojoError(
            f"refusing to load {f}: it is not a plain tensor file ({str(exc).splitlines()[0][:120]})"
        ) from None
