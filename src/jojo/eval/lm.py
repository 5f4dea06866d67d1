"""Language-model metrics on held-out text: loss, perplexity, bits per byte and top-1 token accuracy.

The training loop's validation, `jojo eval --data DIR --split val` and the quickstart all go through the same
per-batch code (`_scored_batches`), so their figures are the same quantity: the mean loss in nats over every
predicted (non-ignored) token, accumulated batch by batch as `sum(batch mean * batch tokens) / tokens`.

Functions the rest of Jojo calls:

- `evaluate_loss(model, source, device, dtype, max_batches) -> (mean loss, tokens)`: the training loop's
  validation loss (`source` is a `BatchLoader(..., shuffle=False)` or anything with `iter_sequential`).
- `evaluate_split(model, tokenizer, data_dir, split, *, batch_size, max_batches, stride, device, dtype) -> dict`:
  the metrics on a prepared split. With `stride=None` it reads exactly the rows the training loop's validation
  reads (`BatchLoader(..., shuffle=False).iter_sequential`), so with the run's `data.batch_size` and
  `logging.eval_iters` its `bpb` is the training loop's `val_bpb` to the last bit.
- `evaluate_text(model, tokenizer, source, *, fmt, split_on, field, batch_size, stride, ...) -> dict`: the same on
  raw files (a file, folder or glob read by `jojo prepare`'s readers and split into documents the same way,
  each document preceded by `<|endoftext|>` as in the shards).
- `token_byte_lengths(tokenizer) -> np.ndarray`: each token id's length in raw bytes.

The figures (N scored tokens t_i, natural-log probabilities p):

    loss        = -(1/N) sum_i ln p(t_i | context)              (nats per token)
    perplexity  = exp(loss)
    accuracy    = (1/N) #{i : argmax p(. | context) == t_i}     (top-1 over the whole output layer)
    bpb_scored  = -sum_i ln p(t_i | context) / ln 2 / sum_i bytes(t_i)
    bpb         = prepared split: loss / ln 2 / (split bytes / split tokens)   <- the training loop's formula
                  raw text:       bpb_scored

bytes(t) is the length of token t's raw bytes: byte-level BPE spells every token in GPT-2's 256-character byte
alphabet, so each character maps back to exactly one byte. A token may hold half of a UTF-8 character, which
decoding would turn into U+FFFD (3 bytes): never measure a token by its decoded string. Special tokens count the
bytes of their text, except `<|endoftext|>`, which counts 0: it is the separator the reader puts before each
document, not text of the corpus (the split's byte count in meta.json does not include it either).

Windows: by default non-overlapping rows of block_size + 1 tokens (every token predicted once, from the
context since the row's start). With `stride=S` (S <= block_size) the windows are block_size tokens long and start
every S tokens; each window scores only the tokens no earlier window scored, so every token after the first
block has at least block_size - S tokens of context (the "sliding window" perplexity of Hugging Face's guide).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from jojo.device import autocast
from jojo.errors import JojoError
from jojo.model import IGNORE_INDEX
from jojo.tokenizer import EOT, Tokenizer, byte_level_alphabet

LN2 = math.log(2)


def _scored_batches(model, source, device: torch.device, dtype: torch.dtype, max_batches: int):
    """(logits, targets, mean loss, predicted tokens) for each batch of `source.iter_sequential(max_batches)`.
    The token count is a device tensor: reading it is the caller's choice (a host sync on a GPU)."""
    for batch in source.iter_sequential(max_batches):
        x = batch["input_ids"].to(device)
        y = batch["targets"].to(device)
        kwargs = {"doc_ids": batch["doc_ids"].to(device)} if "doc_ids" in batch else {}
        with autocast(device, dtype):
            logits, loss = model(x, y, **kwargs)
        yield logits, y, loss, (y != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    source,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int = 0,
) -> tuple[float, int]:
    """Mean loss (nats per predicted token) over the first `max_batches` batches of `source.iter_sequential`
    (0 = all) and the number of predicted tokens. Each batch's mean is weighted by its token count, so the
    result is the mean over tokens whatever the batch sizes."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # Sums stay on the device and are read once at the end: a float()/int() per batch would make the host wait
    # for the GPU at every batch instead of queueing the next one.
    total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for _, _, loss, n in _scored_batches(model, source, device, dtype, max_batches):
        total += torch.where(n > 0, loss.to(total.dtype) * n, 0.0)  # a batch without targets has a NaN mean: skip it
        count += n
    model.train(was_training)
    count = int(count)
    return (float(total) / count if count else float("nan")), count


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / LN2 / bytes_per_token


@torch.no_grad()
def lm_metrics(
    model: torch.nn.Module,
    source,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int = 0,
    byte_lengths: np.ndarray | None = None,
) -> dict:
    """loss, perplexity, accuracy, tokens and (with `byte_lengths`) bytes_scored / bpb_scored over the batches
    of `source` (see the module docstring). The loss is accumulated exactly as `evaluate_loss` does."""
    was_training = model.training
    model.eval()
    lengths = torch.as_tensor(byte_lengths, dtype=torch.long, device=device) if byte_lengths is not None else None
    total, count, correct, nbytes = 0.0, 0, 0, 0
    for logits, y, loss, n in _scored_batches(model, source, device, dtype, max_batches):
        n = int(n)
        if not n:
            continue
        total += float(loss) * n
        count += n
        mask = y != IGNORE_INDEX
        correct += int((logits.argmax(-1) == y)[mask].sum())
        if lengths is not None:
            nbytes += int(lengths[y[mask]].sum())
    model.train(was_training)
    loss = total / count if count else float("nan")
    out = {
        "loss": loss,
        "perplexity": _exp(loss),
        "accuracy": correct / count if count else float("nan"),
        "tokens": count,
    }
    if lengths is not None:
        out["bytes_scored"] = nbytes
        out["bpb_scored"] = total / LN2 / nbytes if nbytes else float("nan")
    return out


def _exp(x: float) -> float:
    """exp that saturates to inf instead of raising OverflowError (and keeps nan)."""
    return math.exp(x) if x < 700 or math.isnan(x) else float("inf")


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Raw byte length of every token id (index = id), from the vocabulary itself, never from decoding.

    Vocabulary entries are spelled in GPT-2's byte-level alphabet (one character per byte); added tokens
    count the UTF-8 bytes of their text, except <|endoftext|> (the document separator), which counts 0."""
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise JojoError("bits per byte needs a byte-level BPE tokenizer (a tokenizer.json with a BPE vocabulary)")
    added = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys(), tokenizer.vocab_size - 1]) + 1
    lengths = np.zeros(size, dtype=np.int64)
    alphabet = byte_level_alphabet()
    for piece, idx in vocab.items():
        if idx in added:
            continue
        if any(c not in alphabet for c in piece):
            raise JojoError(
                f"bits per byte needs a byte-level BPE tokenizer; vocabulary entry {piece!r} is not spelled in "
                "GPT-2's byte alphabet"
            )
        lengths[idx] = len(piece)  # one alphabet character per raw byte
    for idx, content in added.items():
        lengths[idx] = 0 if content == EOT else len(content.encode("utf-8"))
    return lengths


# ---- windows over token streams ----------------------------------------------------------------------
class TokenWindows:
    """Evaluation rows over token streams (1-D arrays, e.g. memory-mapped shards), with `iter_sequential`
    like `BatchLoader`: batches of {"input_ids", "targets"} where targets already scored by an earlier window
    (and the padding of a short last row) are IGNORE_INDEX.

    Window k of a stream of n tokens starts at s = k * stride, feeds tokens [s, e) with e = min(s + T, n - 1)
    and scores the targets s+1 .. e that no earlier window scored; the last window ends at the stream's end,
    so every token but the first is scored exactly once."""

    def __init__(self, streams: list, block_size: int, batch_size: int, stride: int | None = None):
        stride = block_size if stride is None else stride
        if not 1 <= stride <= block_size:
            raise JojoError(f"--stride must be between 1 and the context length {block_size}, got {stride}")
        if batch_size < 1:
            raise JojoError("--batch-size must be >= 1")
        self.streams, self.block_size, self.batch_size = streams, block_size, batch_size
        self.rows: list[tuple[int, int, int, int]] = []  # (stream, start, end, first scored target)
        for si, stream in enumerate(streams):
            n = len(stream)
            scored, s = 0, 0
            while scored < n - 1:
                e = min(s + block_size, n - 1)
                self.rows.append((si, s, e, max(scored + 1, s + 1)))
                scored, s = e, s + stride

    def iter_sequential(self, max_batches: int = 0):
        T = self.block_size
        for count, i in enumerate(range(0, len(self.rows), self.batch_size)):
            if max_batches and count >= max_batches:
                return
            rows = self.rows[i : i + self.batch_size]
            x = np.zeros((len(rows), T), dtype=np.int64)
            y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
            for r, (si, s, e, first) in enumerate(rows):
                chunk = np.asarray(self.streams[si][s : e + 1], dtype=np.int64)
                x[r, : e - s] = chunk[:-1]
                y[r, first - s - 1 : e - s] = chunk[first - s :]
            yield {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y)}


# ---- the two entry points ----------------------------------------------------------------------------
def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def evaluate_split(
    model,
    tokenizer: Tokenizer,
    data_dir: str | Path,
    split: str = "val",
    *,
    batch_size: int = 8,
    max_batches: int = 0,
    stride: int | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """LM metrics on a prepared split (see the module docstring); `bpb` is the training loop's formula."""
    from jojo.data.loader import BatchLoader, TokenSplit
    from jojo.data.prepare import load_meta

    meta = load_meta(data_dir)
    if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer.hash:
        raise JojoError(
            f"{data_dir} was prepared with another tokenizer than the model's ({meta['tokenizer_hash']} != "
            f"{tokenizer.hash}); prepare it with the checkpoint's tokenizer.json (jojo prepare --tokenizer)"
        )
    if split not in meta["splits"] or not meta["splits"][split]["tokens"]:
        raise JojoError(f"{data_dir} has no '{split}' split (or it is empty); prepare one with jojo prepare")
    info = meta["splits"][split]
    T = model.config.block_size
    if stride is None:
        source = BatchLoader(data_dir, split, batch_size=batch_size, block_size=T, shuffle=False, evaluation=True)
    else:
        source = TokenWindows(TokenSplit(data_dir, split).shards, T, batch_size, stride)
    device = device or _device_of(model)
    out = lm_metrics(model, source, device, dtype, max_batches, token_byte_lengths(tokenizer))
    out["bytes_per_token"] = info["bytes"] / info["tokens"]
    out["bpb"] = bits_per_byte(out["loss"], out["bytes_per_token"])
    out.update(
        source=f"{data_dir} ({split} split)",
        split_tokens=info["tokens"],
        batch_size=batch_size,
        max_batches=max_batches,
        stride=stride,
    )
    if info.get("entropy_floor_bpb") is not None:
        out["entropy_floor_bpb"] = info["entropy_floor_bpb"]
    return out


def evaluate_text(
    model,
    tokenizer: Tokenizer,
    source: str | Path,
    *,
    fmt: str = "auto",
    split_on: str = "auto",
    field: str | None = None,
    batch_size: int = 8,
    max_batches: int = 0,
    stride: int | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """LM metrics on raw text files, read as `jojo prepare --source` reads them (`bpb` = `bpb_scored`)."""
    from jojo.data.prepare import DocEncoder
    from jojo.data.recipes import open_source

    docs, nbytes = [], 0
    for rec in open_source(str(source), fmt=fmt, split_on=split_on, field=field).records():
        docs.append(rec["text"])
        nbytes += len(rec["text"].encode("utf-8"))
    if not docs:
        raise JojoError(f"{source} holds no text; point --text at files with some")
    tokens = DocEncoder(tokenizer).encode_docs(docs)
    windows = TokenWindows([tokens], model.config.block_size, batch_size, stride)
    device = device or _device_of(model)
    out = lm_metrics(model, windows, device, dtype, max_batches, token_byte_lengths(tokenizer))
    out["bpb"] = out["bpb_scored"]
    out.update(
        source=str(source),
        documents=len(docs),
        text_bytes=nbytes,
        text_tokens=int(len(tokens)),
        batch_size=batch_size,
        max_batches=max_batches,
        stride=stride,
    )
    return out
