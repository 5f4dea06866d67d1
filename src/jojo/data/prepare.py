"""Prepare: tokenize a corpus into token shards.

Output directory layout (self-describing; `jojo train --dataset DIR` needs nothing else):

    DIR/meta.json          tokenizer hash, dtype, token/byte/doc counts per split, the shard list
    DIR/tokenizer.json     a copy of the tokenizer the shards were made with
    DIR/train_00000.bin    raw token ids (uint16 when the vocabulary fits, else uint32), memory-mappable
    DIR/val_00000.bin

Every document is preceded by `<|endoftext|>`, so documents are separated by it and every document start is
marked (the loader's document-aligned rows use that). Bytes counts are the UTF-8 bytes of the document texts
(the separator not included): val loss in bits / val bytes is bits per byte. When every document carries its
information content (`bits`, as the synthetic corpus does), meta.json also records each split's entropy floor.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jojo.errors import JojoError
from jojo.tokenizer import Tokenizer

META_FILE = "meta.json"
SHARD_TOKENS = 100_000_000  # ~200 MB of uint16 per shard


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class ShardWriter:
    """Appends token arrays to size-bounded shard files of one split."""

    def __init__(self, out_dir: Path, split: str, dtype, shard_tokens: int = SHARD_TOKENS):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._fh = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._fh = open(self.out_dir / (name + ".tmp"), "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._fh is None or self._count >= self.shard_tokens:
                self._close_current()
                self._open()
            room = self.shard_tokens - self._count
            chunk, tokens = tokens[:room], tokens[room:]
            self._fh.write(chunk.astype(self.dtype, copy=False).tobytes())
            self._count += len(chunk)
            self.shards[-1]["tokens"] += len(chunk)

    def _close_current(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            name = self.shards[-1]["file"]
            os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def prepare_records(
    records: Iterable[dict],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    source: str = "",
    batch_docs: int = 512,
) -> dict:
    """Tokenize documents into train/val shards (split by document with a seeded coin) and write meta.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    rng = random.Random(seed)
    writers = {s: ShardWriter(out_dir, s, dtype) for s in ("train", "val")}
    stats = {s: {"docs": 0, "tokens": 0, "bytes": 0, "bits": 0.0} for s in writers}
    all_bits = True
    batch: list[dict] = []

    def flush() -> None:
        texts = [r["text"] for r in batch]
        for rec, ids in zip(batch, tokenizer.encode_batch(texts)):
            split = "val" if rec["_val"] else "train"
            arr = np.empty(len(ids) + 1, dtype=np.int64)
            arr[0] = tokenizer.eot_id
            arr[1:] = ids
            writers[split].write(arr)
            st = stats[split]
            st["docs"] += 1
            st["tokens"] += len(arr)
            st["bytes"] += len(rec["text"].encode("utf-8"))
            st["bits"] += float(rec.get("bits") or 0.0)
        batch.clear()

    for rec in records:
        rec = dict(rec)
        rec["_val"] = rng.random() < val_fraction
        all_bits = all_bits and isinstance(rec.get("bits"), int | float)
        batch.append(rec)
        if len(batch) >= batch_docs:
            flush()
    flush()

    total_docs = stats["train"]["docs"] + stats["val"]["docs"]
    if total_docs == 0:
        for w in writers.values():
            w.close()
        raise JojoError("the corpus is empty: no documents found; check the file and its format")
    if stats["val"]["docs"] == 0 or stats["train"]["docs"] == 0:
        # A tiny corpus can miss a split by chance; move one document is not possible after writing, so ask.
        for w in writers.values():
            w.close()
        raise JojoError(
            f"the corpus has only {total_docs} document(s): too few for both a train and a val split; "
            "add documents or change --val-fraction"
        )
    splits = {}
    for split, writer in writers.items():
        st = stats[split]
        info = {"docs": st["docs"], "tokens": st["tokens"], "bytes": st["bytes"], "shards": writer.close()}
        if all_bits:
            info["bits"] = st["bits"]
            info["entropy_floor_bpb"] = st["bits"] / st["bytes"]
        splits[split] = info
    tokenizer.save(out_dir)
    meta = {
        "version": 1,
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": np.dtype(dtype).name,
        "source": source,
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": splits,
    }
    tmp = out_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / META_FILE)
    return meta


def load_meta(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not data_dir.is_dir():
        raise JojoError(f"prepared data not found: {data_dir}; run `jojo prepare` first or fix --dataset")
    if not path.is_file():
        raise JojoError(f"{data_dir} has no {META_FILE}; it is not a prepared dataset (run `jojo prepare`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise JojoError(f"{path} is corrupt; re-run `jojo prepare`") from None
    for split, info in meta.get("splits", {}).items():
        for shard in info["shards"]:
            if not (data_dir / shard["file"]).is_file():
                raise JojoError(
                    f"shard {shard['file']} of split '{split}' is missing in {data_dir}; re-run `jojo prepare`"
                )
    return meta
