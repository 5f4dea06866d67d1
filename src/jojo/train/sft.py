"""Supervised fine-tuning (SFT): from a base model to a chat model, through the one training loop.

SFT is pretraining with a different batch source: conversations rendered with the one chat template (ChatML,
`jojo.tokenizer.render_chat`), a loss mask, and a starting checkpoint. Nothing else changes: `fit` runs it.

The loss mask. A conversation becomes

    <|endoftext|> <|im_start|>system\\n{..}<|im_end|>\\n <|im_start|>user\\n{..}<|im_end|>\\n
                  <|im_start|>assistant\\n{answer}<|im_end|>\\n ...

and only the assistant's `{answer}` tokens and its closing `<|im_end|>` are targets: the system and user turns,
the `<|im_start|>assistant\\n` header (the prompt gives it at inference), the newline after `<|im_end|>` and
padding get IGNORE_INDEX. Learning to emit `<|im_end|>` is what lets a chat stop.

Each message is encoded as `<|im_start|>` + encode(role + "\\n") + encode(content) + `<|im_end|>` + encode("\\n"):
the header apart from the content, because at inference the prompt ends at the header and the model writes the
content from there. For every content that does not start with whitespace this is exactly
`tokenizer.encode(render_chat(messages))`, i.e. what Hugging Face's `apply_chat_template` gives on the export.

Packing. With `data.packing` several conversations share a row; `doc_ids` tell the model where each one starts,
so attention never crosses a conversation and positions restart (a conversation's logits are the same alone or
packed). Without it, one conversation per row, right-padded. Either way each conversation is whole: one longer
than the context is a bad record, never cut.

Bad records (a message without a role, an unknown role, an empty assistant turn, no assistant turn at all, ChatML
marker text inside a message, a conversation longer than the context) are skipped and counted, or stop the run
with `on_bad="error"`; they are never trained on with a wrong mask.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from jojo import checkpoint as ckpt_io
from jojo.data.messages import MESSAGE_FORMATS, messages_from_record
from jojo.errors import JojoError
from jojo.model import IGNORE_INDEX
from jojo.tokenizer import EOT, IM_END, IM_START, Tokenizer, encode_chat
from jojo.train.loop import FitResult, fit

EMBEDDED = "embedded"
ROLES = ("system", "user", "assistant")
ON_BAD = ("skip", "error")


# ---- messages ------------------------------------------------------------------------------------------
def check_messages(messages: list[dict]) -> str | None:
    """Why a normalised conversation cannot be trained on, or None when it can."""
    if not messages:
        return "no messages"
    answers = 0
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role not in ROLES:
            return f"message {i} has role {role!r}; roles are {', '.join(ROLES)}"
        if role == "system" and i != 0:
            return f"message {i} is a system message after the start"
        if any(s in content for s in (IM_START, IM_END, EOT)):
            return f"message {i} contains ChatML marker text ({IM_START}, {IM_END} or {EOT})"
        if role == "assistant":
            if not content.strip():
                return f"message {i} is an empty assistant turn"
            answers += 1
    if not answers:
        return "no assistant turn (nothing to learn)"
    return None


# ---- reading conversations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _PassThrough:
    """A `TextFormat` stand-in for `FileSource`: each record comes through as JSON with where it was read, so
    the readers (JSONL, JSON arrays, Parquet, gz/zst, folders, globs) are reused and SFT validates each record
    itself (a bad record is counted, not a reason to stop reading)."""

    def columns(self):
        return None

    def render(self, obj, where: str) -> str:
        return json.dumps([where, obj])


def iter_records(path: str) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of a JSONL / JSON / Parquet file, folder or glob."""
    from jojo.data.sources import FileSource, file_format

    source = FileSource(path, text=_PassThrough())  # type: ignore[arg-type]
    for p in source.paths:
        if file_format(p) not in ("jsonl", "json", "parquet"):
            raise JojoError(f"{p}: SFT data must be JSONL, JSON or Parquet records (conversations or Alpaca)")
    for rec in source.records():
        where, obj = json.loads(rec["text"])
        yield where, obj


@dataclass
class Conversation:
    ids: list[int]
    train: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SFTData:
    train: list[Conversation]
    val: list[Conversation]
    description: str
    bad: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few bad records, with where and why

    @property
    def skipped(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        n_tok = sum(len(c) for c in self.train)
        text = (
            f"{self.description}: {len(self.train):,} train / {len(self.val):,} val conversations, "
            f"{n_tok:,} train tokens"
        )
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.bad.most_common())
            text += f"; skipped {self.skipped} bad conversation(s): {reasons} (first: {self.examples[0]})"
        return text


def _reason_kind(reason: str) -> str:
    """A short category for the skip counts (the full reason goes in the examples)."""
    for key in ("no role", "empty assistant", "longer than the context", "ChatML marker", "role", "system",
                "no assistant", "content", "JSON object", "list"):  # fmt: skip
        if key in reason:
            return {"role": "unknown role", "list": "not a conversation", "content": "no content"}.get(key, key)
    return "malformed"


def embedded_conversations(n: int, seed: int = 0, qa_fraction: float = 0.6) -> list[list[dict]]:
    """Jojo's synthetic chat set: `n` conversations, a `qa_fraction` of them single closed-world questions
    (colours, sounds, opposites, plurals, counting, sums), the rest the embedded corpus's chats (greetings,
    names, small talk, stories, several questions). Questions come from their own random stream, not the one
    `heldout_questions` draws from (the closed world is small, so the same question may occur in both)."""
    from jojo.data.synthetic import generate_chats, question_program, sample
    from jojo.tokenizer import parse_chatml

    n_qa = int(round(qa_fraction * n))
    chats = [parse_chatml(doc.text) for doc in generate_chats(n - n_qa, seed=seed)]
    rng = random.Random(f"jojo.sft/questions/{seed}")
    drills = []
    for _ in range(n_qa):
        s = sample(question_program, rng)
        drills.append([{"role": "user", "content": s.text}, {"role": "assistant", "content": s.result[1]}])
    mixed = chats + drills
    random.Random(f"jojo.sft/mix/{seed}").shuffle(mixed)
    return mixed


def load_sft_data(
    tok: Tokenizer,
    source: str,
    block_size: int,
    *,
    fmt: str = "auto",
    on_bad: str = "skip",
    val_fraction: float = 0.05,
    seed: int = 0,
    embedded_n: int = 8000,
) -> SFTData:
    """Read, validate, encode and split conversations. `source`: 'embedded' or a file/folder/glob."""
    if fmt not in MESSAGE_FORMATS:
        raise JojoError(f"unknown SFT data format '{fmt}'; choose from {', '.join(MESSAGE_FORMATS)}")
    if on_bad not in ON_BAD:
        raise JojoError(f"unknown --on-bad '{on_bad}'; choose skip or error")
    if not 0.0 <= val_fraction < 1.0:
        raise JojoError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not source or source == EMBEDDED:
        records: Iterable[tuple[str, object]] = (
            (f"embedded chat {i}", {"messages": m}) for i, m in enumerate(embedded_conversations(embedded_n, seed))
        )
        description = f"embedded synthetic chats (seed {seed})"
    else:
        records = iter_records(source)
        description = source
    convs: list[Conversation] = []
    bad: Counter = Counter()
    examples: list[str] = []
    for where, obj in records:
        try:
            messages = messages_from_record(obj, fmt)
            reason = check_messages(messages)
            if reason is None:
                ids, train = encode_chat(tok, messages)
                # a row holds inputs ids[:-1] and targets ids[1:]: len(ids) - 1 positions
                if len(ids) - 1 > block_size:
                    reason = f"{len(ids) - 1} tokens, longer than the context ({block_size})"
        except ValueError as exc:
            reason = str(exc)
        if reason is not None:
            if on_bad == "error":
                raise JojoError(f"{where}: {reason} (pass --on-bad skip to skip such conversations)")
            bad[_reason_kind(reason)] += 1
            if len(examples) < 3:
                examples.append(f"{where}: {reason}")
            continue
        convs.append(Conversation(ids, train))
    if not convs:
        why = f" ({examples[0]})" if examples else ""
        raise JojoError(f"no usable conversations in {description}{why}")
    order = list(range(len(convs)))
    random.Random(f"jojo.sft/split/{seed}").shuffle(order)
    n_val = int(round(val_fraction * len(convs)))
    if val_fraction > 0 and len(convs) >= 2:
        n_val = min(max(n_val, 1), len(convs) - 1)
    val = [convs[i] for i in order[:n_val]]
    train = [convs[i] for i in order[n_val:]]
    return SFTData(train, val, description, bad, examples)


# ---- batches ------------------------------------------------------------------------------------------
def pack_rows(convs: list[Conversation], order: Iterable[int], block_size: int, packing: bool) -> list[list[int]]:
    """Group conversations (by index, in `order`) into rows of at most block_size positions: next-fit when
    packing (a row takes the following conversations while they fit), else one per row."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = len(convs[i]) - 1
        if current and (not packing or used + n > block_size):
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


class SFTSource:
    """Masked (and optionally packed) batches of conversations, in the interface `fit` reads.

    Each epoch shuffles the conversations (seeded by the epoch), packs them into rows and takes
    `batch_size * world_size` rows per step; rank r keeps its own slice. The position (epoch, step) is the
    whole state, so a resumed run reads what an uninterrupted one would have."""

    def __init__(
        self,
        convs: list[Conversation],
        batch_size: int,
        block_size: int,
        pad_id: int,
        *,
        packing: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not convs:
            raise JojoError("no conversations to batch")
        self.convs, self.batch_size, self.block_size = convs, batch_size, block_size
        self.pad_id, self.packing, self.shuffle, self.seed = pad_id, packing, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.step = 0, 0
        self._rows = self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.convs)))
        if self.shuffle:
            random.Random(f"jojo.sft/epoch/{self.seed}/{epoch}").shuffle(order)
        return pack_rows(self.convs, order, self.block_size, self.packing)

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self._rows) // (self.batch_size * self.world_size), 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._rows = self._epoch_rows(self.epoch)

    def make_batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Rows of conversation indices -> input_ids, targets [, doc_ids], padded to the longest row."""
        width = max(sum(len(self.convs[i]) - 1 for i in row) for row in rows)
        x = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        d = np.full((len(rows), width), -1, dtype=np.int64)  # padding is its own "document"
        for r, row in enumerate(rows):
            pos = 0
            for k, i in enumerate(row):
                conv = self.convs[i]
                n = len(conv) - 1
                ids = np.asarray(conv.ids, dtype=np.int64)
                x[r, pos : pos + n] = ids[:-1]
                y[r, pos : pos + n] = np.where(np.asarray(conv.train[1:]), ids[1:], IGNORE_INDEX)
                d[r, pos : pos + n] = k
                pos += n
        batch = {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y)}
        if self.packing:
            batch["doc_ids"] = torch.from_numpy(d)
        return batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        per_step = self.batch_size * self.world_size
        if (self.step + 1) * per_step > len(self._rows):  # the epoch's last partial batch is dropped
            self.epoch += 1
            self.step = 0
            self._rows = self._epoch_rows(self.epoch)
        start = self.step * per_step + self.rank * self.batch_size
        rows = self._rows[start : start + self.batch_size]
        self.step += 1
        return self.make_batch(rows)

    def iter_sequential(self, max_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Every row in order (the last batch may be smaller): for validation."""
        rows = pack_rows(self.convs, range(len(self.convs)), self.block_size, self.packing)
        for b, start in enumerate(range(0, len(rows), self.batch_size)):
            if max_batches and b >= max_batches:
                return
            yield self.make_batch(rows[start : start + self.batch_size])

    def token_stats(self) -> dict:
        """Over one epoch's batches: positions, non-padding positions, and trained (assistant) targets."""
        rows = self._epoch_rows(0)
        per = self.batch_size
        positions = real = trained = 0
        for start in range(0, len(rows) - per + 1 if len(rows) >= per else 1, per):
            chunk = rows[start : start + per]
            lengths = [sum(len(self.convs[i]) - 1 for i in row) for row in chunk]
            positions += max(lengths) * len(chunk)
            real += sum(lengths)
            trained += sum(sum(self.convs[i].train[1:]) for row in chunk for i in row)
        return {
            "positions": positions,
            "tokens": real,
            "trained_tokens": trained,
            "trained_fraction": trained / max(positions, 1),
            "trained_fraction_of_tokens": trained / max(real, 1),
            "rows": len(rows),
            "conversations_per_row": len(self.convs) / max(len(rows), 1),
        }


# ---- the command ----------------------------------------------------------------------------------------
@dataclass
class SFTResult:
    fit: FitResult
    data: SFTData
    stats: dict
    lora: dict | None = None

    @property
    def checkpoint(self) -> Path:
        return self.fit.checkpoint


def run_sft(
    cfg,
    init_from: str | None,
    *,
    quiet: bool = False,
    say=print,
    resume: bool = False,
    overrides: dict | None = None,
) -> SFTResult:
    """Fine-tune the checkpoint `init_from` on cfg.data.dataset ('embedded' or conversation files) with `fit`.

    The model config (block size included) and the tokenizer are the checkpoint's. With cfg.lora.rank > 0 only
    low-rank adapters train, and checkpoints hold the merged weights (plain GPT weights).

    resume: continue the run in cfg.logging.out_dir from its latest checkpoint (weights, optimizer, data
    position, random state), given the same data and options; `init_from` is then not needed.

    overrides: the command line's override tree: an explicit model.* value that differs from the checkpoint's
    architecture is refused; a resume lists what it honours."""
    from jojo.train.lock import RunLock
    from jojo.train.run import check_memory, keep_architecture, resume_line
    from jojo.train.system import setup_runtime, teardown_runtime

    resume_from = _sft_start(cfg, init_from, resume)
    rt = setup_runtime(cfg.system)
    lock = RunLock(cfg.logging.out_dir)
    try:
        lock.acquire()  # one writer per run directory, before anything is written into it
        model, tok, state = ckpt_io.load_checkpoint(resume_from or init_from, rt.device)
        if resume_from is not None:
            if "sft" not in state:
                raise JojoError(f"{resume_from} is not an SFT checkpoint; resume it with `jojo train --resume`")
            init_from = state["sft"]["init_from"]
        keep_architecture(overrides, cfg.model, model.config, resume_from or init_from, resume=resume_from is not None)
        if resume_from is not None and rt.is_main and not quiet:
            say(resume_line(cfg, state, overrides, resume_from))
        cfg = dataclasses.replace(cfg, model=model.config)
        if cfg.system.compile is None:
            # auto: no compiling for SFT. Its batches vary in length (dynamic shapes: recompiles, and with torch
            # 2.13's inductor on CPU a RoPE model's compiled backward failed a stride check); --compile still asks.
            cfg = dataclasses.replace(cfg, system=dataclasses.replace(cfg.system, compile=False))
        if not cfg.lora.rank:  # the estimate counts gradients and AdamW moments for every weight: not LoRA's case
            check_memory(cfg, rt, loaded=model)
        data, train_src, val_src, stats = _sft_sources(cfg, tok, rt, say)
        lora_info, state_dict_fn = _sft_lora(cfg, model, rt, say)
        model.train()
        extra = {"sft": {"init_from": str(init_from), "data": data.description, "packing": cfg.data.packing,
                         "skipped": dict(data.bad), "trained_fraction": stats["trained_fraction"],
                         "lora": lora_info}}  # fmt: skip
        result = fit(cfg, model, tok, train_src, val_src, rt, extra_state=extra, quiet=quiet,
                     state_dict_fn=state_dict_fn, resume_from=resume_from)  # fmt: skip
        return SFTResult(result, data, stats, lora_info)
    finally:
        lock.release()
        teardown_runtime(rt)


def _sft_start(cfg, init_from: str | None, resume: bool) -> Path | None:
    """The checkpoint a resumed run continues from (None for a new run), after refusing what cannot start."""
    run_dir = Path(cfg.logging.out_dir)
    if resume:
        if not (run_dir / "latest").exists():
            raise JojoError(f"nothing to resume in {run_dir}: no 'latest' checkpoint; drop --resume to start fresh")
        if cfg.lora.rank:
            raise JojoError(
                "--resume does not work with LoRA: its checkpoints hold the merged weights, not the adapters; "
                f"start a new run from them instead (jojo sft {run_dir} --lora-rank {cfg.lora.rank} --out NEW_DIR)"
            )
        return ckpt_io.resolve_checkpoint(run_dir)
    if not init_from:
        raise JojoError("SFT starts from a pretrained model: pass --init-from CKPT (a checkpoint or run directory)")
    if (run_dir / "latest").exists():
        raise JojoError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    return None


def _sft_sources(cfg, tok: Tokenizer, rt, say):
    """The conversations, read and split, as training and validation batch sources, and their token stats."""
    block = cfg.model.block_size
    data = load_sft_data(tok, cfg.data.dataset, block, fmt=cfg.data.format, on_bad=cfg.data.on_bad,
                         val_fraction=cfg.data.val_fraction, seed=cfg.system.seed,
                         embedded_n=cfg.data.embedded_chats)  # fmt: skip
    if rt.is_main:
        say(data.summary())
    common = dict(batch_size=cfg.data.batch_size, block_size=block, pad_id=tok.eot_id, packing=cfg.data.packing)
    train_src = SFTSource(data.train, seed=cfg.system.seed, rank=rt.rank, world_size=rt.world_size, **common)
    val_src = SFTSource(data.val or data.train[:1], shuffle=False, **common)
    stats = train_src.token_stats()
    if rt.is_main:
        say(
            f"{'packed' if cfg.data.packing else 'padded'} rows: {stats['conversations_per_row']:.1f} "
            f"conversations per row; trained on {100 * stats['trained_fraction']:.1f}% of positions "
            f"({100 * stats['trained_fraction_of_tokens']:.1f}% of non-padding tokens: the assistant turns)"
        )
    return data, train_src, val_src, stats


def _sft_lora(cfg, model, rt, say):
    """With cfg.lora.rank: adapters on the targets, and checkpoints that hold the merged weights."""
    from jojo.train.lora import apply_lora, lora_summary, merged_state_dict

    if not cfg.lora.rank:
        return None, None
    adapted = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    info = lora_summary(model, adapted, cfg.lora)
    if rt.is_main:
        say(
            f"LoRA rank {cfg.lora.rank} on {len(adapted)} matrices ({cfg.lora.targets}): "
            f"{info['trainable']:,} trainable of {info['total']:,} parameters"
        )
    return info, lambda: merged_state_dict(model)
