"""One typed configuration for every command.

Architecture lives in `ModelConfig` (a plain dataclass, as nanoGPT's GPTConfig); a run's arguments live in
`TrainConfig`, whose sections are typed dataclasses validated in `__post_init__`. JSON files and
`--section.key=value` overrides land in the same objects, and defaults live here only.

    cfg = load_config("configs/tiny.json", ["--optimizer.lr=1e-3", "--max-iters", "200"])
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jojo.errors import JojoError, ensure_dir

FAMILIES = ("gpt2", "llama")


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise JojoError(f"invalid value {value!r} for '{key}'; allowed values: {', '.join(map(str, allowed))}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad:
        raise JojoError(f"invalid value {value!r} for '{key}'; it must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class ModelConfig:
    """Architecture only. `family` picks the recipe; family-dependent fields left as None are resolved
    to the family's default in __post_init__, so a saved config is always explicit."""

    family: str = "gpt2"
    vocab_size: int = 50304
    block_size: int = 1024  # context length in tokens
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention (llama); None -> n_head
    n_embd: int = 768
    mlp_hidden: int | None = None  # gpt2: 4*n_embd; llama: ~8/3*n_embd rounded up to a multiple of 64
    bias: bool | None = None  # gpt2: True; llama: False
    tie_embeddings: bool | None = None  # gpt2: True; llama: False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("model.family", self.family, FAMILIES)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            raise JojoError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise JojoError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise JojoError("model.n_kv_head must equal model.n_head for the gpt2 family (use family 'llama')")
        if self.family == "llama" and (self.n_embd // self.n_head) % 2:
            raise JojoError("model.n_embd / model.n_head must be even for RoPE (llama family)")
        if self.mlp_hidden is None:
            if self.family == "gpt2":
                self.mlp_hidden = 4 * self.n_embd
            else:
                self.mlp_hidden = 64 * math.ceil(int(8 * self.n_embd / 3) / 64)
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.tie_embeddings is None:
            self.tie_embeddings = self.family == "gpt2"
        if not 0.0 <= self.dropout < 1.0:
            raise JojoError(f"invalid value {self.dropout!r} for 'model.dropout'; it must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class DataConfig:
    dataset: str = ""  # a prepared data directory (train.bin/val.bin/meta.json), made by `jojo prepare`
    batch_size: int = 8  # micro-batch rows per device per step; 0 ("auto" on the command line): largest that fits
    global_batch: int = 0  # rows per optimizer step over all ranks and micro-steps, kept by batch_size auto
    doc_aligned: bool = False  # every row starts at a document start
    packing: bool = True  # SFT: several conversations per row (no attention across them), else one per row

    def __post_init__(self) -> None:
        _check_positive("data.batch_size", self.batch_size, allow_zero=True)
        _check_positive("data.global_batch", self.global_batch, allow_zero=True)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 6e-4
    weight_decay: float = 0.1  # applied to matrices only (embeddings and linear weights), never norms/biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1
    muon_lr: float = 0.02
    muon_momentum: float = 0.95

    def __post_init__(self) -> None:
        _check_choice("optimizer.name", self.name, ("adamw", "muon"))
        _check_positive("optimizer.lr", self.lr)
        _check_positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optimizer.grad_clip", self.grad_clip, allow_zero=True)
        _check_positive("optimizer.grad_accum", self.grad_accum)
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise JojoError(f"invalid value {getattr(self, key)!r} for 'optimizer.{key}'; it must be in [0, 1)")


@dataclass
class ScheduleConfig:
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs or max_tokens
    epochs: float = 0.0
    max_tokens: int = 0
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: fraction of the run spent decaying
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _check_choice("schedule.decay", self.decay, ("cosine", "wsd", "constant"))
        _check_positive("schedule.max_steps", self.max_steps, allow_zero=True)
        _check_positive("schedule.epochs", self.epochs, allow_zero=True)
        _check_positive("schedule.max_tokens", self.max_tokens, allow_zero=True)
        _check_positive("schedule.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise JojoError(f"invalid value {self.min_lr_ratio!r} for 'schedule.min_lr_ratio'; it must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise JojoError(
                f"invalid value {self.decay_fraction!r} for 'schedule.decay_fraction'; it must be in (0, 1]"
            )


@dataclass
class SystemConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast); auto = bf16 on capable GPUs, else fp32
    compile: bool = False  # torch.compile the model (worth it on GPUs; minutes of compiling on a CPU)
    fsdp: bool = False  # under torchrun on GPUs: shard parameters/grads/optimizer state (FSDP2) instead of DDP
    tf32: bool = True  # CUDA float32 matmuls/convolutions on TF32 tensor cores
    seed: int = 1337
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    force: bool = False  # skip the start-up check that refuses a run whose memory estimate exceeds the device's

    def __post_init__(self) -> None:
        _check_choice("system.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise JojoError(
                f"invalid value {self.device!r} for 'system.device'; allowed values: auto, cpu, cuda, cuda:N, mps"
            )


@dataclass
class LoggingConfig:
    out_dir: str = "runs/jojo"
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 20  # batches per validation; 0 = the whole validation split
    checkpoint_interval: int = 0  # steps; 0 = only at evaluations and at the end
    checkpoint_minutes: float = 0.0
    keep_last: int = 2
    progress: bool = True
    patience: int = 0  # early stopping: stop after this many evaluations without a better val loss; 0 = never
    tensorboard: bool = False  # scalars and sampled text in OUT_DIR/tensorboard
    wandb: bool = False  # Weights & Biases (pip install wandb; WANDB_MODE=offline works without an account)
    wandb_project: str = "jojo"
    sample_tokens: int = 48  # tokens of the text sample generated at each evaluation (tensorboard/wandb); 0 = none

    def __post_init__(self) -> None:
        for key in ("log_interval", "eval_interval"):
            _check_positive(f"logging.{key}", getattr(self, key))
        _check_positive("logging.keep_last", self.keep_last)
        for key in ("patience", "checkpoint_interval", "eval_iters", "sample_tokens"):
            _check_positive(f"logging.{key}", getattr(self, key), allow_zero=True)
        _check_positive("logging.checkpoint_minutes", self.checkpoint_minutes, allow_zero=True)


@dataclass
class LoraConfig:
    """Low-rank adapters (jojo.lora): rank 0 = off (every weight trains)."""

    rank: int = 0
    alpha: float = 0.0  # 0 = 2 * rank; the update is scaled by alpha / rank
    targets: str = "qkv,proj"  # comma-separated: qkv, proj, attn, fc, gate, up, mlp_proj, mlp, lm_head

    def __post_init__(self) -> None:
        _check_positive("lora.rank", self.rank, allow_zero=True)
        _check_positive("lora.alpha", self.alpha, allow_zero=True)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        ensure_dir(Path(path).parent)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# Flat flags users know from nanoGPT / litgpt, mapped onto the one config.
FLAT_FLAGS = {
    "dataset": "data.dataset",
    "batch-size": "data.batch_size",
    "epochs": "schedule.epochs",
    "max-iters": "schedule.max_steps",
    "max-steps": "schedule.max_steps",
    "max-tokens": "schedule.max_tokens",
    "learning-rate": "optimizer.lr",
    "lr": "optimizer.lr",
    "grad-accum": "optimizer.grad_accum",
    "optimizer": "optimizer.name",
    "eval-interval": "logging.eval_interval",
    "log-interval": "logging.log_interval",
    "checkpoint-interval": "logging.checkpoint_interval",
    "seed": "system.seed",
    "device": "system.device",
    "dtype": "system.dtype",
    "output-checkpoint": "logging.out_dir",
    "out": "logging.out_dir",
    "family": "model.family",
    "block-size": "model.block_size",
    "global-batch": "data.global_batch",
    "compile": "system.compile",
    "fsdp": "system.fsdp",
    "patience": "logging.patience",
    "tensorboard": "logging.tensorboard",
    "wandb": "logging.wandb",
    "checkpoint-minutes": "logging.checkpoint_minutes",
    "packing": "data.packing",
    "lora-rank": "lora.rank",
    "lora-alpha": "lora.alpha",
    "lora-targets": "lora.targets",
    "force": "system.force",
}


# Integer keys that also accept the word "auto", stored as 0.
AUTO_INT_KEYS = {"data.batch_size"}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, allowed: list[str]) -> JojoError:
    close = difflib.get_close_matches(key.split(".")[-1], allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return JojoError(f"unknown config key '{key}'{hint}; allowed keys: {', '.join(allowed)}")


def _coerce(key: str, raw: Any, typ: Any) -> Any:
    """Turn a JSON value or a command-line string into the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None
        typ = args[0]
    if key in AUTO_INT_KEYS and isinstance(raw, str) and raw.lower() == "auto":
        return 0
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(float(raw)) if isinstance(raw, str) and "e" in raw.lower() else int(raw)
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if typ is str:
            if not isinstance(raw, str):
                raise ValueError
            return raw
    except (TypeError, ValueError):
        pass
    else:
        return raw
    if typ is bool:
        raise JojoError(f"invalid value {raw!r} for '{key}'; allowed values: true, false")
    raise JojoError(f"invalid value {raw!r} for '{key}'; expected {getattr(typ, '__name__', typ)}")


def _build(cls, values: dict, prefix: str):
    types_ = _field_types(cls)
    kwargs = {}
    for key, raw in values.items():
        full = f"{prefix}{key}"
        if key not in types_:
            raise _unknown(full, list(types_))
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(raw, dict):
                raise JojoError(f"invalid value for '{full}': expected a JSON object of {typ.__name__} keys")
            kwargs[key] = _build(typ, raw, f"{full}.")
        else:
            kwargs[key] = _coerce(full, raw, typ)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise JojoError(f"config key '{dotted}' does not name a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """`--section.key=value`, `--section.key value` and the flat flags in FLAT_FLAGS -> nested dict."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise JojoError(f"unexpected argument '{arg}'; overrides look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"  # a bare boolean flag
        dotted = FLAT_FLAGS.get(name, name.replace("-", "_"))
        if "." not in dotted:
            allowed = sorted(FLAT_FLAGS) + [f.name + ".KEY" for f in dataclasses.fields(TrainConfig)]
            close = difflib.get_close_matches(name, sorted(FLAT_FLAGS), n=1)
            hint = f" (did you mean '--{close[0]}'?)" if close else ""
            raise JojoError(f"unknown option '--{name}'{hint}; allowed: --{', --'.join(allowed)}")
        _set_dotted(tree, dotted, value)
        i += 1
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_dir() -> Path:
    return Path(__file__).parent / "configs"


def resolve_config_path(name: str | Path) -> Path:
    """A path to a JSON file, or the name of a preset in configs/ ('tiny', 'gpt2-124m')."""
    path = Path(name)
    if path.is_file():
        return path
    preset = preset_dir() / f"{name}.json"
    if preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in preset_dir().glob("*.json")))
    raise JojoError(f"config file not found: {name}; give a JSON file path or a preset name ({presets})")


def read_json(path: str | Path, what: str = "JSON file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise JojoError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JojoError(f"{what} {path} is not valid JSON ({exc}); fix or regenerate it") from None
    if not isinstance(data, dict):
        raise JojoError(f"{what} {path} must hold a JSON object")
    return data


def config_from_dict(tree: dict) -> TrainConfig:
    return _build(TrainConfig, tree, "")


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults <- JSON file (a path or preset name) <- overrides, validated into a TrainConfig."""
    tree: dict = {}
    if path:
        tree = read_json(resolve_config_path(path), "config file")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        tree = _merge(tree, extra)
    return config_from_dict(tree)


def model_config_from_dict(values: dict) -> ModelConfig:
    return _build(ModelConfig, values, "model.")
