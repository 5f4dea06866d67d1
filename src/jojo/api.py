"""Jojo as a Python library: every `jojo` command is a thin caller of these functions.

    import jojo

    data = jojo.prepare(out="runs/data")                              # the embedded corpus -> token shards
    run = jojo.pretrain(config="tiny", dataset=data.path, out="runs/tiny", max_iters=200)
    chat = jojo.finetune(run.checkpoint, data="embedded", out="runs/chat", max_iters=100)

    lm = jojo.LM.load("runs/chat")
    lm.generate("Once upon a time", max_tokens=50, temperature=0.8, top_k=50, seed=0)
    lm.chat([{"role": "user", "content": "What colour is a banana?"}], temperature=0)
    lm.score("Once upon a time there was a cat.")   # Score(bits=..., bits_per_byte=..., tokens=...)

Training functions take the same configuration as the commands (one config system, one validation): a preset or
JSON file (`config=`), then overrides, either as flat names (`max_iters=200`, `batch_size=8`, `lr=3e-3`, as the
command line's --max-iters ...), section dicts (`optimizer={"lr": 3e-3}`) or section__key (`model__n_layer=6`).
Bad input raises `jojo.JojoError` with a one-line message.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from jojo.checkpoint import load_checkpoint, resolve_checkpoint
from jojo.config import (
    TrainConfig,
    config_from_dict,
    merge_overrides,
    overrides_from_kwargs,
    parse_overrides,
    read_json,
    resolve_config_path,
)
from jojo.device import pick_device
from jojo.errors import JojoError
from jojo.infer.decode import convert_for_decoding
from jojo.infer.engine import SamplingConfig, TextGenerator
from jojo.train.loop import FitResult
from jojo.train.run import run_training
from jojo.train.sft import SFTResult, run_sft

EMBEDDED = "embedded"


# ---- using a model ------------------------------------------------------------------------------------------
@dataclass
class Score:
    """How well the model predicts a text: total bits (-log2 p of every token, the first predicted from
    <|endoftext|>), bits per UTF-8 byte of the text, and the number of tokens scored."""

    bits: float
    bits_per_byte: float
    tokens: int


class LM:
    """A trained model and its tokenizer, ready to use. `LM.load(path)` reads a checkpoint or run directory.

    `.model` (the `jojo.model.GPT`), `.tokenizer`, `.config` (its `ModelConfig`) and `.state` (the checkpoint's
    step, metrics and run config) are there for people who want the pieces."""

    def __init__(self, model, tokenizer, state: dict | None = None):
        self.model, self.tokenizer, self.state = model, tokenizer, state or {}
        self.generator = TextGenerator(model, tokenizer)
        self.fast = False
        self._engine = None

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", fast: bool = True) -> LM:
        """Load for inference on `device` (auto: a GPU if there is one). `fast` converts the model for fast
        one-row CPU decoding (`jojo.infer.decode`; inference only: the weights stop requiring gradients)."""
        model, tok, state = load_checkpoint(path, pick_device(device))
        if fast:
            convert_for_decoding(model)
        lm = cls(model, tok, state)
        lm.fast = fast
        lm.path = resolve_checkpoint(path)
        return lm

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @staticmethod
    def _sampling(max_tokens=200, temperature=0.8, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None):
        return SamplingConfig(max_tokens, temperature, top_k, top_p, repetition_penalty, seed)

    def stream(self, prompt: str, *, stop: list[str] | None = None, nonstop: bool = False, **sampling) -> Iterator[str]:
        """Text pieces of the continuation of `prompt` as they are decoded. Sampling options as `generate`;
        `nonstop` keeps going past the context (the oldest half is dropped when it is full)."""
        ids = self.generator.prompt_ids(prompt)
        return self.generator.stream(ids, self._sampling(**sampling), stop or (), nonstop=nonstop)

    def generate(self, prompt: str | list[str], *, stop: list[str] | None = None, **sampling) -> str | list[str]:
        """The continuation of `prompt` (a list of prompts -> a list of continuations, in order).

        max_tokens=200, temperature=0.8 (0 = greedy), top_k=0 (off), top_p=1.0 (off), repetition_penalty=1.0
        (off), seed=None, stop=[strings that end the text, not included]. Generation also ends at
        <|endoftext|> and at the context length."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, stop=stop, **sampling))
        return [r.text for r in self.generate_batch(prompt, stop=stop, **sampling)]

    def generate_batch(self, prompts: list[str], *, stop: list[str] | None = None, **sampling) -> list:
        """Every prompt through the batched engine (`jojo.infer.batch`, continuous batching): `Result`s in input
        order, each with `.text`, `.finish_reason` (stop | length), `.token_ids` and `.record()` (the line
        `jojo generate --prompt-file` writes). At temperature 0 each equals its single `generate`."""
        sc = self._sampling(**sampling)
        ids = [self.generator.prompt_ids(p) for p in prompts]
        for p, i in zip(prompts, ids):
            if len(i) >= self.config.block_size:
                raise JojoError(
                    f"the prompt {p[:40]!r}... is {len(i)} tokens but the model's context is {self.config.block_size}"
                    "; shorten it"
                )
        results = self.engine.generate_many(ids, sc, stop=stop or ())
        for p, r in zip(prompts, results):
            r.prompt = p
        return results

    @property
    def engine(self):
        """The batched engine over this model (made on first use)."""
        if self._engine is None:
            from jojo.infer.batch import BatchEngine

            self._engine = BatchEngine(self.model, self.tokenizer, max_batch=8, convert=self.fast)
        return self._engine

    def chat(self, messages: list[dict], *, stream: bool = False, stop: list[str] | None = None, **sampling):
        """The assistant's reply to a conversation ([{"role": "system" | "user" | "assistant", "content"}]),
        rendered with the ChatML template SFT trains on; a generator of text pieces with stream=True."""
        ids = self.generator.chat_ids(messages)
        if len(ids) >= self.config.block_size:
            raise JojoError(
                f"the conversation is {len(ids)} tokens but the model's context is {self.config.block_size}; "
                "drop the oldest messages"
            )
        pieces = self.generator.stream(ids, self._sampling(**sampling), stop or (), chat=True)
        return pieces if stream else "".join(pieces)

    @torch.inference_mode()
    def score(self, text: str) -> Score:
        """Bits of `text` under the model, in windows of the context length (each window predicts its tokens
        from the tokens before them in the same window)."""
        if not text:
            raise JojoError("score needs a non-empty text")
        ids = torch.tensor(self.generator.prompt_ids(text), device=self.device)
        block, nats = self.config.block_size, 0.0
        for start in range(0, len(ids) - 1, block):
            window = ids[start : start + block + 1]
            logits, _ = self.model(window[None, :-1])
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            nats -= float(logp.gather(1, window[1:, None]).sum())
        bits = nats / math.log(2)
        return Score(bits=bits, bits_per_byte=bits / len(text.encode("utf-8")), tokens=len(ids) - 1)


# ---- making a model ------------------------------------------------------------------------------------------
def presets(assumed_vocab: int = 4096) -> list[dict]:
    """Every preset in configs/ with its architecture and parameter count (the model is built on the meta
    device: no memory). A preset without a vocabulary size takes the tokenizer's when it trains; it is counted
    here at `assumed_vocab`."""
    from jojo.config import model_config_from_dict, preset_dir
    from jojo.model import GPT

    rows = []
    for path in sorted(preset_dir().glob("*.json")):
        tree = read_json(path, "preset")
        if "model" not in tree:  # a fine-tuning preset (sft-tiny): the model is the checkpoint's
            continue
        model_tree = dict(tree.get("model", {}))
        vocab_given = "vocab_size" in model_tree
        model_tree.setdefault("vocab_size", assumed_vocab)
        cfg = model_config_from_dict(model_tree)
        with torch.device("meta"):
            model = GPT(cfg)
        rows.append({"name": path.stem, "config": cfg, "params": model.num_params(), "vocab_given": vocab_given,
                     "non_embedding_params": model.num_params(non_embedding=True)})  # fmt: skip
    return rows


def run_config(
    config: str | Path | dict | None,
    overrides: list[str] | dict | None = None,
    *,
    default: str = "tiny",
    resume: bool = False,
) -> TrainConfig:
    """The config of a run: a preset name, a JSON file or a dict (default: `default`, or for a resumed run
    the run's own saved config), then overrides (command-line style list or a tree). `resume` reads the run
    directory named by the overrides' logging.out_dir."""
    extra = parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else (overrides or {})
    if isinstance(config, dict):
        tree = config
    elif config is None and resume:
        out = extra.get("logging", {}).get("out_dir")
        if not out:
            raise JojoError("--resume continues the run in --out DIR: give --out")
        tree = saved_run_config(out)
    else:
        tree = read_json(resolve_config_path(config or default), "config file")
    return config_from_dict(merge_overrides(tree, extra))


def saved_run_config(run_dir: str | Path) -> dict:
    """The config a run was started with: its latest checkpoint's, else run_config.json."""
    run_dir = Path(run_dir)
    if (run_dir / "latest").exists():
        state_file = resolve_checkpoint(run_dir) / "state.json"
        if state_file.is_file():
            saved = read_json(state_file, "checkpoint state").get("run_config")
            if saved:
                return saved
    if (run_dir / "run_config.json").is_file():
        return read_json(run_dir / "run_config.json", "run config")
    raise JojoError(f"nothing to resume in {run_dir}: no 'latest' checkpoint; drop --resume to start fresh")


def _overrides(overrides: list[str] | dict | None, kwargs: dict, **named) -> dict:
    tree = parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else dict(overrides or {})
    tree = merge_overrides(tree, overrides_from_kwargs({k: v for k, v in kwargs.items() if v is not None}))
    return merge_overrides(tree, overrides_from_kwargs({k: v for k, v in named.items() if v is not None}))


def pretrain(
    config: str | Path | dict | None = None,
    dataset: str | Path | None = None,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    init_from: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    quiet: bool = False,
    **options,
) -> FitResult:
    """Pretrain (or continue training) a model on a prepared dataset; returns the run's `FitResult` (final
    train/val loss, val bpb, steps, tokens/s, `.checkpoint`). `config` defaults to the `tiny` preset, or to the
    run's own config with resume=True."""
    tree = _overrides(overrides, options, dataset=str(dataset) if dataset else None, out=str(out) if out else None)
    cfg = run_config(config, tree, default="tiny", resume=resume)
    init = str(init_from) if init_from else None
    return run_training(cfg, resume=resume, init_from=init, quiet=quiet, overrides=tree)


def finetune(
    checkpoint: str | Path | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    config: str | Path | dict | None = None,
    resume: bool = False,
    overrides: list[str] | dict | None = None,
    quiet: bool = False,
    say=print,
    **options,
) -> SFTResult:
    """Fine-tune a pretrained checkpoint for chat (SFT; `lora_rank=8` for LoRA) on conversations ('embedded' =
    Jojo's synthetic chats, or JSONL/JSON/Parquet of messages or Alpaca records); returns an `SFTResult`
    (`.fit` is the FitResult, `.checkpoint` the chat model). `config` defaults to `sft-tiny`, or to the run's
    own config with resume=True (then `checkpoint` is not needed)."""
    tree = _overrides(overrides, options, data=str(data) if data else None, out=str(out) if out else None)
    cfg = run_config(config, tree, default="sft-tiny", resume=resume)
    init = str(checkpoint) if checkpoint else None
    return run_sft(cfg, init, resume=resume, quiet=quiet, say=say, overrides=tree)


@dataclass
class PrepareResult:
    path: Path
    meta: dict
    cache_hit: bool


def prepare(
    source: str | Path | None = None,
    out: str | Path | None = None,
    *,
    dataset: str | None = None,
    hf: str | None = None,
    subset: str | None = None,
    split: str | None = None,
    format: str = "auto",
    split_on: str = "auto",
    field: str | None = None,
    template: str | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    tokenizer_sample_mb: float = 100,
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    seed: int = 0,
    docs: int | None = None,
    workers: int = 0,
    shard_tokens: int = 100_000_000,
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Tokenize a corpus into token shards (`jojo prepare`): a file, folder or glob (`source`), a named recipe
    (`dataset`), a Hugging Face dataset (`hf`), or with none of these Jojo's embedded corpus. `out` defaults to
    data/<recipe or source name>. Without `tokenizer`, one is trained on the corpus."""
    from jojo.data.prepare import prepare_corpus
    from jojo.data.recipes import open_source

    src = open_source(
        str(source) if source else None,
        dataset=dataset,
        hf=hf,
        subset=subset,
        split=split,
        fmt=format,
        split_on=split_on,
        field=field,
        template=template,
        docs=docs,
        seed=seed,
    )
    if out is None:
        name = dataset or (hf.split("/")[-1] if hf else None) or (Path(str(source)).stem if source else EMBEDDED)
        out = Path("data") / name
    meta, hit = prepare_corpus(
        src,
        out,
        tokenizer=str(tokenizer) if tokenizer else None,
        vocab_size=vocab_size,
        tokenizer_sample_mb=tokenizer_sample_mb,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        workers=workers,
        max_docs=0 if src.description == EMBEDDED else (docs or 0),
        shard_tokens=shard_tokens,
        overwrite=overwrite,
        progress=progress,
    )
    return PrepareResult(Path(out), meta, hit)
