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


def opt(default, help: str, **kw):
    """A config field with its one-line description (the --help text of `jojo train` and `jojo sft`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# The families are named presets of the model's parts: the value each part takes when the config leaves it None.
FAMILY_PARTS = {
    "gpt2": {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "tie_embeddings": True},
    "llama": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False},
}
POSITIONS, NORMS, MLPS = ("learned", "rope"), ("layernorm", "rmsnorm"), ("gelu", "swiglu")


@dataclass
class ModelConfig:
    """Architecture only. The parts (positions, norm, MLP, biases, tying, n_kv_head) are independent choices;
    `family` names the preset that fills the parts left as None, resolved in __post_init__, so a saved config is
    always explicit. A GPT-2 block with RoPE and RMSNorm is `family=gpt2, positions=rope, norm=rmsnorm`."""

    family: str = opt("gpt2", "gpt2 or llama: the preset that fills the parts left unset")
    vocab_size: int = opt(50304, "embedding rows (sized from the tokenizer when smaller, padded to a multiple of 64)")
    block_size: int = opt(1024, "context length in tokens")
    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_kv_head: int | None = opt(None, "key/value heads (grouped-query attention when < n_head); unset = n_head")
    n_embd: int = opt(768, "width of the residual stream")
    positions: str | None = opt(None, "learned (a position table) or rope (rotary); unset = the family's")
    norm: str | None = opt(None, "layernorm or rmsnorm; unset = the family's")
    mlp: str | None = opt(None, "gelu or swiglu; unset = the family's")
    mlp_hidden: int | None = opt(None, "MLP width; unset = 4 x n_embd (gelu) or ~8/3 x n_embd rounded to 64 (swiglu)")
    bias: bool | None = opt(None, "biases in linear layers and LayerNorm; unset = the family's (gpt2 yes, llama no)")
    tie_embeddings: bool | None = opt(None, "the output head shares the token embedding; unset = the family's")
    norm_eps: float = opt(1e-5, "epsilon of the norms")
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    dropout: float = opt(0.0, "dropout probability (0 for pretraining small models)")

    def __post_init__(self) -> None:
        _check_choice("model.family", self.family, FAMILIES)
        for key, value in FAMILY_PARTS[self.family].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        _check_choice("model.positions", self.positions, POSITIONS)
        _check_choice("model.norm", self.norm, NORMS)
        _check_choice("model.mlp", self.mlp, MLPS)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_positive("model.n_kv_head", self.n_kv_head)
        if self.n_embd % self.n_head:
            raise JojoError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise JojoError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise JojoError("model.n_embd / model.n_head must be even for RoPE (model.positions=rope)")
        if self.mlp_hidden is None:
            if self.mlp == "gelu":
                self.mlp_hidden = 4 * self.n_embd
            else:
                self.mlp_hidden = 64 * math.ceil(int(8 * self.n_embd / 3) / 64)
        if not 0.0 <= self.dropout < 1.0:
            raise JojoError(f"invalid value {self.dropout!r} for 'model.dropout'; it must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class DataConfig:
    dataset: str = opt("", "a folder made by `jojo prepare` (train); SFT: 'embedded' or conversation files")
    batch_size: int = opt(8, "micro-batch rows per device per step; 'auto' (CUDA): the largest that fits")
    global_batch: int = opt(0, "rows per optimizer step over all ranks and micro-steps (sets grad_accum); 0 = off")
    doc_aligned: bool = opt(False, "every training row starts at a document start")
    packing: bool = opt(True, "SFT: several conversations per row (no attention across them), else one per row")
    format: str = opt("auto", "SFT data format: auto, chatml (messages/conversations), alpaca or qa")
    on_bad: str = opt("skip", "SFT: a bad conversation is skipped and counted (skip) or stops the run (error)")
    val_fraction: float = opt(0.05, "SFT: fraction of the conversations held out for validation")
    embedded_chats: int = opt(8000, "SFT on 'embedded' data: how many synthetic conversations to generate")

    def __post_init__(self) -> None:
        _check_positive("data.batch_size", self.batch_size, allow_zero=True)
        _check_positive("data.global_batch", self.global_batch, allow_zero=True)
        _check_choice("data.format", self.format, ("auto", "chatml", "alpaca", "qa"))
        _check_choice("data.on_bad", self.on_bad, ("skip", "error"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise JojoError(f"invalid value {self.val_fraction!r} for 'data.val_fraction'; it must be in [0, 1)")
        _check_positive("data.embedded_chats", self.embedded_chats)


@dataclass
class OptimizerConfig:
    name: str = opt("adamw", "adamw, or muon (Muon for hidden matrices, AdamW for the rest)")
    lr: float = opt(6e-4, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.1, "applied to matrices only (embeddings, linear weights), never norms or biases")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = off")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    muon_lr: float = opt(0.02, "Muon's learning rate for hidden matrices")
    muon_momentum: float = opt(0.95, "Muon's momentum")

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
    max_steps: int = opt(0, "optimizer steps; 0 = derived from epochs or max_tokens")
    epochs: float = opt(0.0, "passes over the training split (when max_steps is 0)")
    max_tokens: int = opt(0, "training tokens (when max_steps and epochs are 0)")
    max_seconds: float = opt(0.0, "a time budget (--time-budget 5m): the LR schedule runs on elapsed time and the "
                             "run ends at the deadline; 0 = off")  # fmt: skip
    warmup_steps: int = opt(100, "linear learning-rate warm-up steps")
    decay: str = opt("cosine", "cosine, wsd (warmup-stable-decay) or constant")
    decay_fraction: float = opt(0.2, "wsd: fraction of the run spent decaying")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")

    def __post_init__(self) -> None:
        _check_choice("schedule.decay", self.decay, ("cosine", "wsd", "constant"))
        _check_positive("schedule.max_steps", self.max_steps, allow_zero=True)
        _check_positive("schedule.epochs", self.epochs, allow_zero=True)
        _check_positive("schedule.max_tokens", self.max_tokens, allow_zero=True)
        _check_positive("schedule.max_seconds", self.max_seconds, allow_zero=True)
        _check_positive("schedule.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise JojoError(f"invalid value {self.min_lr_ratio!r} for 'schedule.min_lr_ratio'; it must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise JojoError(
                f"invalid value {self.decay_fraction!r} for 'schedule.decay_fraction'; it must be in (0, 1]"
            )


@dataclass
class SystemConfig:
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt(
        "auto",
        "autocast dtype: auto (bf16 where the GPU or CPU has native bf16 math, else float32; evaluation on a CPU "
        "stays float32), float32, bfloat16, float16",
    )
    compile: bool | None = opt(
        None,
        "torch.compile the model: true, false, or auto (unset): on a CPU with native bf16 for runs of >= 300 "
        "steps or a >= 2 min budget, where it pays for its ~20 s of compiling; pass --compile on GPUs",
    )
    fsdp: bool = opt(False, "under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    tf32: bool = opt(True, "CUDA float32 matmuls on TF32 tensor cores")
    seed: int = opt(1337, "random seed (weights, data order)")
    threads: int = opt(0, "CPU threads for torch; 0 = torch's default")
    force: bool = opt(False, "skip the start-up check that refuses a run whose memory estimate exceeds the device's")

    def __post_init__(self) -> None:
        _check_choice("system.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise JojoError(
                f"invalid value {self.device!r} for 'system.device'; allowed values: auto, cpu, cuda, cuda:N, mps"
            )


@dataclass
class LoggingConfig:
    out_dir: str = opt("runs/jojo", "the run directory: checkpoints, metrics.jsonl, loss.png")
    log_interval: int = opt(10, "steps between train-loss log lines")
    eval_interval: int = opt(100, "steps between evaluations (each also saves a checkpoint)")
    eval_iters: int = opt(20, "validation batches per evaluation; 0 = the whole validation split")
    checkpoint_interval: int = opt(0, "steps between extra checkpoints; 0 = only at evaluations and the end")
    checkpoint_minutes: float = opt(0.0, "also save every N minutes; 0 = off")
    keep_last: int = opt(2, "numbered checkpoints kept (plus latest and best)")
    progress: bool = opt(True, "a progress bar on a terminal")
    patience: int = opt(0, "stop after this many evaluations without a better val loss; 0 = never")
    tensorboard: bool = opt(False, "scalars and text samples in OUT/tensorboard")
    wandb: bool = opt(False, "log to Weights & Biases (pip install wandb; WANDB_MODE=offline works offline)")
    wandb_project: str = opt("jojo", "the W&B project")
    sample_tokens: int = opt(48, "tokens of the text sample at each evaluation (tensorboard/wandb); 0 = none")
    eval_tasks: str = opt("", "zero-shot tasks run at each evaluation (hellaswag,arc-easy,...; jojo eval's data)")
    eval_limit: int = opt(500, "items of each --eval-tasks task per evaluation; 0 = all")
    eval_data_dir: str = opt("", "folder of the task data (default $JOJO_EVAL_DIR or ~/.cache/jojo/eval)")

    def __post_init__(self) -> None:
        for key in ("log_interval", "eval_interval"):
            _check_positive(f"logging.{key}", getattr(self, key))
        _check_positive("logging.keep_last", self.keep_last)
        for key in ("patience", "checkpoint_interval", "eval_iters", "sample_tokens", "eval_limit"):
            _check_positive(f"logging.{key}", getattr(self, key), allow_zero=True)
        _check_positive("logging.checkpoint_minutes", self.checkpoint_minutes, allow_zero=True)


@dataclass
class LoraConfig:
    """Low-rank adapters (jojo.train.lora): rank 0 = off (every weight trains)."""

    rank: int = opt(0, "LoRA rank; 0 = off (full fine-tuning)")
    alpha: float = opt(0.0, "LoRA scale alpha (update x alpha / rank); 0 = 2 x rank")
    targets: str = opt("qkv,proj", "layers with adapters: qkv, proj, attn, fc, gate, up, mlp_proj, mlp, lm_head")

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
    "time-budget": "schedule.max_seconds",
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
    "data": "data.dataset",
    "format": "data.format",
    "on-bad": "data.on_bad",
    "val-fraction": "data.val_fraction",
    "embedded-chats": "data.embedded_chats",
    "force": "system.force",
    "eval-tasks": "logging.eval_tasks",
    "eval-limit": "logging.eval_limit",
}


# Integer keys that also accept the word "auto", stored as 0.
AUTO_INT_KEYS = {"data.batch_size"}
# Durations in seconds that also accept "90s", "5m", "1.5h".
DURATION_KEYS = {"schedule.max_seconds"}
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(key: str, raw: str) -> float:
    text = raw.strip().lower()
    scale = _UNITS.get(text[-1:])
    try:
        return float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise JojoError(f"invalid value {raw!r} for '{key}'; give seconds or a duration like 90s, 5m, 1.5h") from None


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
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "auto")):
            return None
        typ = args[0]
    if key in AUTO_INT_KEYS and isinstance(raw, str) and raw.lower() == "auto":
        return 0
    if key in DURATION_KEYS and isinstance(raw, str):
        return parse_duration(key, raw)
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
        if not eq and name.startswith("no-") and _is_bool_key(FLAT_FLAGS.get(name[3:], name[3:].replace("-", "_"))):
            name, value = name[3:], "false"  # --no-packing, --no-compile, --no-data.packing
        dotted = FLAT_FLAGS.get(name, name.replace("-", "_"))
        if "." not in dotted:
            allowed = sorted(FLAT_FLAGS) + [f.name + ".KEY" for f in dataclasses.fields(TrainConfig)]
            close = difflib.get_close_matches(name, sorted(FLAT_FLAGS), n=1)
            hint = f" (did you mean '--{close[0]}'?)" if close else ""
            raise JojoError(f"unknown option '--{name}'{hint}; allowed: --{', --'.join(allowed)}")
        _set_dotted(tree, dotted, value)
        i += 1
    return tree


def _is_bool_key(dotted: str) -> bool:
    section, _, key = dotted.partition(".")
    sections = _field_types(TrainConfig)
    if section not in sections or not dataclasses.is_dataclass(sections[section]):
        return False
    typ = _field_types(sections[section]).get(key)
    return typ is bool or (typing.get_origin(typ) in (typing.Union, types.UnionType) and bool in typing.get_args(typ))


def overrides_from_kwargs(kwargs: dict) -> dict:
    """Python keyword arguments -> an override tree: flat names (`max_iters=200`, `batch_size=8`, as the command
    line's --max-iters), section dicts (`optimizer={"lr": 1e-3}`) or section__key (`model__n_layer=6`)."""
    tree: dict = {}
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in kwargs.items():
        if name in sections and isinstance(value, dict):
            tree = merge_overrides(tree, {name: value})
            continue
        flat = name.replace("_", "-")
        if flat in FLAT_FLAGS:
            dotted = FLAT_FLAGS[flat]
        elif "__" in name:
            dotted = name.replace("__", ".", 1)
        else:
            close = difflib.get_close_matches(flat, sorted(FLAT_FLAGS), n=1)
            hint = f" (did you mean '{close[0].replace('-', '_')}'?)" if close else ""
            raise JojoError(
                f"unknown option '{name}'{hint}; use a flat name (max_iters, batch_size, lr, ...), a section dict "
                "(optimizer={'lr': 1e-3}) or section__key (model__n_layer=6)"
            )
        _set_dotted(tree, dotted, value)
    return tree


def merge_overrides(base: dict, extra: dict) -> dict:
    """`extra` laid over `base`, section by section (neither is changed)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
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
        tree = merge_overrides(tree, extra)
    return config_from_dict(tree)


def model_config_from_dict(values: dict) -> ModelConfig:
    return _build(ModelConfig, values, "model.")


def config_help(preset: str | None = None) -> str:
    """Every option of a run, from the config fields: `--section.key TYPE  description (default ...)`, with the
    flat aliases beside their keys. The defaults shown are the preset's (what a run without --config gets)."""
    defaults = load_config(preset) if preset else TrainConfig()
    aliases: dict[str, list[str]] = {}
    for flat, dotted in FLAT_FLAGS.items():
        aliases.setdefault(dotted, []).append(f"--{flat}")
    lines = []
    for section in dataclasses.fields(TrainConfig):
        cls = section.type if dataclasses.is_dataclass(section.type) else _field_types(TrainConfig)[section.name]
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            dotted = f"{section.name}.{f.name}"
            typ = _field_types(cls)[f.name]
            base = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
            value = getattr(getattr(defaults, section.name), f.name)
            shown = json.dumps(value) if not isinstance(value, str) else (repr(value) if value else "''")
            shown = "auto" if value is None else shown  # an unset optional field is decided at run time
            names = ", ".join([f"--{dotted}"] + aliases.get(dotted, []))
            lines.append(f"  {names} {base.__name__.upper()}")
            lines.append(f"      {f.metadata.get('help', '')} (default {shown})")
    return "\n".join(lines)
