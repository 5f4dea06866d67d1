"""Prepare: tokenize a corpus into token shards, streaming, on every core.

Output directory layout (self-describing; `jojo train --dataset DIR` needs nothing else):

    DIR/meta.json          tokenizer hash, dtype, token/byte/doc counts per split, the shard list, the cache key
    DIR/tokenizer.json     a copy of the tokenizer the shards were made with
    DIR/train_00000.bin    raw token ids (uint16 when the vocabulary fits, else uint32), memory-mappable
    DIR/val_00000.bin
    DIR/test_00000.bin     only when --test-fraction > 0 (the split is always listed in meta.json, maybe empty)

Every document is preceded by `<|endoftext|>`, so documents are separated by it and every document start is
marked (the loader's document-aligned rows use that). Byte counts are the UTF-8 bytes of the document texts
(the separator not included): val loss in bits / val bytes is bits per byte. When every document carries its
information content (`bits`, as the synthetic corpus does), meta.json also records each split's entropy floor.

How it runs (bounded memory whatever the corpus size):
- the reader (this process) cuts the input into ~2 MB blocks aligned on document boundaries;
- worker processes (one per core) parse a block into documents, pick each document's split, encode, and send
  back one token array per split; at most 2 blocks per worker are in flight, so RSS stays flat;
- the reader writes the arrays in input order into size-bounded shards (`ShardWriter`).
The split of a document is a keyed hash of its text (key: the seed): fixed for a seed, independent of the
order, the block size and the number of workers, and identical documents always land in the same split.

Encoding uses tiktoken, built from the same tokenizer.json (`Tokenizer.tiktoken_encoding`); each encoder
first checks that tiktoken and `tokenizers` agree on its first 256 KB of documents and uses `tokenizers` if
they ever differ (or if the tokenizer is not convertible).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jojo.data.sources import Block, RecordSource, Source, parse_block
from jojo.errors import JojoError, annotate, ensure_dir
from jojo.tokenizer import EOT, Tokenizer

META_FILE = "meta.json"
TOKENIZER_TMP = "tokenizer.json.tmp"  # Tokenizer.save writes here, then renames
SHARD_TOKENS = 100_000_000  # ~200 MB of uint16 per shard
SPLITS = ("train", "val", "test")
PREPARE_VERSION = 2  # bump when the output for the same input and options changes (invalidates caches)
POOL_AFTER = 16 << 20  # with workers=0 (auto), inputs smaller than this are encoded in-process
VERIFY_BYTES = 256 << 10  # tiktoken is checked against tokenizers on this much text per encoder
_SHARD_NAME = re.compile(r"^(train|val|test)_\d{5}\.bin(\.tmp)?$")


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

    def abort(self) -> None:
        """Close and delete everything written: a failed prepare (a full disk, Ctrl+C) leaves no shard and no
        .tmp taking space (without meta.json they are unusable anyway)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:  # its last flush fails again on a full disk; the file is closed all the same
                pass
            self._fh = None
        for shard in self.shards:
            for name in (shard["file"], shard["file"] + ".tmp"):
                (self.out_dir / name).unlink(missing_ok=True)
        self.shards = []


# ---- encoding ----------------------------------------------------------------------------------------
class DocEncoder:
    """Documents -> one uint32 array, each document preceded by `<|endoftext|>`.

    The fast path encodes a whole block in one tiktoken call: special tokens cut the text before the regex
    runs, in tiktoken as in `tokenizers`, so encoding `EOT + doc1 + EOT + doc2...` at once gives exactly the
    per-document ids, with none of the per-call overhead (which dominates for short documents).
    """

    def __init__(self, tokenizer: Tokenizer, fast: bool = True):
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.eot_id
        self.enc, self.note = tokenizer.tiktoken_encoding() if fast else (None, "disabled")
        self._verified = 0

    @property
    def kind(self) -> str:
        return "tiktoken" if self.enc is not None else "tokenizers"

    def encode_docs(self, docs: list[str]) -> np.ndarray:
        if not docs:
            return np.zeros(0, dtype=np.uint32)
        if self.enc is not None and self._verified < VERIFY_BYTES:
            self._verify(docs)
        if self.enc is not None:
            return self.enc.encode_to_numpy(EOT + EOT.join(docs), allowed_special="all")
        encoded = self.tokenizer.encode_batch(docs)
        out = np.empty(sum(len(ids) for ids in encoded) + len(docs), dtype=np.uint32)
        pos = 0
        for ids in encoded:
            out[pos] = self.eot_id
            out[pos + 1 : pos + 1 + len(ids)] = ids
            pos += 1 + len(ids)
        return out

    def _verify(self, docs: list[str]) -> None:
        sample, size = [], 0
        for doc in docs:
            sample.append(doc)
            size += len(doc)
            if self._verified + size >= VERIFY_BYTES:
                break
        expected = self.tokenizer.encode_batch(sample)
        for doc, ids in zip(sample, expected):
            if self.enc.encode(doc, allowed_special="all") != ids:
                self.enc, self.note = None, f"tiktoken differs from tokenizers on {doc[:40]!r}"
                return
        self._verified += size


class _Splitter:
    """A document's split from a keyed hash of its bytes: fixed per seed, independent of order."""

    def __init__(self, seed: int, val_fraction: float, test_fraction: float):
        self.key = hashlib.sha256(f"jojo-split-{seed}".encode()).digest()[:32]
        self.test_cut = int(test_fraction * 2**64)
        self.val_cut = int((test_fraction + val_fraction) * 2**64)

    def __call__(self, data: bytes) -> str:
        if self.val_cut == 0:
            return "train"
        u = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self.key).digest(), "little")
        return "test" if u < self.test_cut else "val" if u < self.val_cut else "train"


class _BlockEncoder:
    """Parse, split and encode one block (in a worker process, or in-process for small inputs)."""

    def __init__(self, tokenizer: Tokenizer, seed: int, val_fraction: float, test_fraction: float, fast: bool):
        self.encoder = DocEncoder(tokenizer, fast)
        self.splitter = _Splitter(seed, val_fraction, test_fraction)
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, block: Block | list) -> dict:
        docs = parse_block(block) if isinstance(block, Block) else block
        groups = {s: ([], 0, 0.0, 0) for s in SPLITS}  # texts, bytes, bits, docs with bits
        for text, bits in docs:
            data = text.encode("utf-8")
            split = self.splitter(data)
            texts, nbytes, nbits, with_bits = groups[split]
            texts.append(text)
            groups[split] = (texts, nbytes + len(data), nbits + (bits or 0.0), with_bits + (bits is not None))
        out = {}
        for split, (texts, nbytes, nbits, with_bits) in groups.items():
            if texts:
                tokens = self.encoder.encode_docs(texts).astype(self.dtype, copy=False)
                out[split] = (tokens, len(texts), nbytes, nbits, with_bits)
        return {"splits": out, "encoder": self.encoder.kind, "note": self.encoder.note}


_WORKER: dict = {}


def _worker_init(tokenizer_json: str, seed: int, val_fraction: float, test_fraction: float, fast: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer(HFTokenizer.from_str(tokenizer_json))
    _WORKER["encode"] = _BlockEncoder(tok, seed, val_fraction, test_fraction, fast)


def _worker_encode(block: Block) -> dict:
    return _WORKER["encode"](block)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


# ---- output directory: cache and safety -------------------------------------------------------------
def make_cache_key(source_fingerprint: dict, tokenizer_spec, options: dict) -> str:
    """Content of the cache key: the input's identity (paths, sizes, mtimes; or hub name), the tokenizer
    (its hash, or how it is trained) and every option that changes the output."""
    blob = {"version": PREPARE_VERSION, "source": source_fingerprint, "tokenizer": tokenizer_spec, **options}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_meta(out_dir: str | Path, cache_key: str) -> dict | None:
    """meta.json of a complete earlier run with this cache key, or None."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("cache_key") != cache_key or not (out_dir / "tokenizer.json").is_file():
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for info in meta["splits"].values():
        for shard in info["shards"]:
            path = out_dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                return None
    return meta


def claim_out_dir(out_dir: str | Path, tokenizer_hash: str, overwrite: bool = False) -> None:
    """Make `out_dir` ready for new shards. Refuses to replace shards made by another tokenizer (a training
    run pointed at the folder would mix up ids) unless `overwrite`; removes stale shards of this tokenizer."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise JojoError(f"--out {out_dir} is a file; give a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_FILE
    if meta_path.is_file() and not overwrite:
        try:
            old = json.loads(meta_path.read_text()).get("tokenizer_hash")
        except json.JSONDecodeError:
            old = None
        if old and old != tokenizer_hash:
            raise JojoError(
                f"{out_dir} holds shards made with tokenizer {old}, not with this run's tokenizer {tokenizer_hash}; "
                "shards of different tokenizers must not mix: choose another --out, or pass --overwrite to "
                "replace them"
            )
    # meta.json goes first: a run interrupted from here on leaves no meta pointing at half-written shards.
    meta_path.unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if _SHARD_NAME.match(path.name):
            path.unlink()


# ---- the pipeline ------------------------------------------------------------------------------------
def _limit_docs(blocks: Iterable[Block], max_docs: int) -> Iterator[Block]:
    left = max_docs
    for block in blocks:
        docs = parse_block(block)[:left]
        left -= len(docs)
        yield Block("docs", docs, block.where, block.nbytes)
        if left <= 0:
            return


class _Collector:
    """Receives encoded blocks in input order: writes each split's tokens to its shards and keeps the counts."""

    def __init__(self, out_dir: Path, dtype, shard_tokens: int, total_bytes: int | None, progress: bool):
        self.writers = {s: ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
        self.stats = {s: {"docs": 0, "tokens": 0, "bytes": 0, "bits": 0.0, "with_bits": 0} for s in SPLITS}
        self.encoders: dict[str, str] = {}
        self.read_bytes = 0
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="prepare",
                            mininterval=0.5, smoothing=0.05)  # fmt: skip

    def __call__(self, result: dict, nbytes: int) -> None:
        for split, (tokens, ndocs, nbytes_text, nbits, with_bits) in result["splits"].items():
            self.writers[split].write(tokens)
            st = self.stats[split]
            st["docs"] += ndocs
            st["tokens"] += len(tokens)
            st["bytes"] += nbytes_text
            st["bits"] += nbits
            st["with_bits"] += with_bits
        self.encoders[result["encoder"]] = result["note"]
        self.read_bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix(tokens=f"{sum(s['tokens'] for s in self.stats.values()):,}", refresh=False)

    def close(self) -> dict[str, list[dict]]:
        if self.bar is not None:
            self.bar.close()
        return {split: w.close() for split, w in self.writers.items()}

    def splits(self, shards: dict[str, list[dict]]) -> dict:
        """meta.json's per-split counts (and entropy floors when every document carries its bits)."""
        stats = self.stats
        total_docs = sum(st["docs"] for st in stats.values())
        if total_docs == 0:
            raise JojoError("the corpus is empty: no documents found; check the file, its format and --split-on")
        if stats["val"]["docs"] == 0 or stats["train"]["docs"] == 0:
            raise JojoError(
                f"the corpus has only {total_docs} document(s): too few for both a train and a val split; "
                "add documents, split them finer (--split-on) or raise --val-fraction"
            )
        all_bits = all(st["with_bits"] == st["docs"] for st in stats.values())
        splits = {}
        for split in SPLITS:
            st = stats[split]
            info = {"docs": st["docs"], "tokens": st["tokens"], "bytes": st["bytes"], "shards": shards[split]}
            if all_bits:
                info["bits"] = st["bits"]
                if st["bytes"]:
                    info["entropy_floor_bpb"] = st["bits"] / st["bytes"]
            splits[split] = info
        return splits


def prepare_source(
    source: Source,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 0,
    max_docs: int = 0,
    shard_tokens: int = SHARD_TOKENS,
    cache_key: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    fast: bool = True,
    extra_meta: dict | None = None,
) -> dict:
    """Tokenize `source` into train/val/test shards in `out_dir` and write meta.json; returns the meta.

    workers: encoding processes (0 = one per core once the input proves longer than 16 MB; 1 = in-process).
    The caller checks the cache (`cached_meta`) before paying for a tokenizer (`prepare_corpus` does).
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise JojoError("--val-fraction must be in (0, 1), --test-fraction in [0, 1), and their sum below 1")
    out_dir = Path(out_dir)
    claim_out_dir(out_dir, tokenizer.hash, overwrite)
    dtype = token_dtype(tokenizer.vocab_size)
    auto = workers <= 0
    workers = default_workers() if auto else workers
    collect = _Collector(out_dir, dtype, shard_tokens, source.total_bytes, progress)
    started = time.perf_counter()
    blocks = source.blocks()
    if max_docs > 0:
        blocks = _limit_docs(blocks, max_docs)
    try:
        # Small inputs are not worth starting processes for: with `auto`, the first POOL_AFTER bytes are
        # encoded here, and only a longer input hands the rest of its blocks to the pool (same output).
        blocks = iter(blocks)
        if workers == 1 or auto:
            encode = _BlockEncoder(tokenizer, seed, val_fraction, test_fraction, fast)
            for block in blocks:
                collect(encode(block), block.nbytes)
                if auto and workers > 1 and collect.read_bytes >= POOL_AFTER:
                    break
        if not _run_pool(blocks, tokenizer, workers, (seed, val_fraction, test_fraction, fast), collect):
            workers = 1  # everything was encoded in-process
        shards = collect.close()
    except BaseException as exc:
        if collect.bar is not None:
            collect.bar.close()
        _discard(out_dir, collect.writers, exc)  # no shard or temporary file is left taking space
        raise
    seconds = time.perf_counter() - started
    splits = collect.splits(shards)
    try:
        tokenizer.save(out_dir)
    except BaseException as exc:
        _discard(out_dir, collect.writers, exc)
        raise
    options = dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, cache_key=cache_key)
    meta = _meta(tokenizer, dtype, source, splits, options, collect, seconds, workers, extra_meta)
    tmp = out_dir / (META_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out_dir / META_FILE)
    except BaseException as exc:
        _discard(out_dir, collect.writers, exc)
        raise
    return meta


def _meta(tokenizer, dtype, source, splits, options, collect, seconds, workers, extra_meta) -> dict:
    """meta.json: what the shards hold and how they were made."""
    fallback_notes = [note for kind, note in collect.encoders.items() if kind == "tokenizers" and note]
    return {
        "version": PREPARE_VERSION,
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": np.dtype(dtype).name,
        "source": source.description,
        "seed": options["seed"],
        "val_fraction": options["val_fraction"],
        "test_fraction": options["test_fraction"],
        "splits": splits,
        "cache_key": options["cache_key"],
        "build": {
            "seconds": round(seconds, 3),
            "input_bytes": collect.read_bytes,
            "workers": workers,
            "encoder": "+".join(sorted(collect.encoders)) or "none",
            **({"encoder_note": fallback_notes[0]} if fallback_notes else {}),
        },
        **(extra_meta or {}),
    }


def _discard(out_dir: Path, writers: dict, exc: BaseException) -> None:
    """After a failed prepare (a full disk, Ctrl+C): delete its shards and temporary files, which take space and,
    without meta.json, are unusable; say where it happened."""
    for w in writers.values():
        w.abort()
    for name in (TOKENIZER_TMP, META_FILE + ".tmp"):
        (out_dir / name).unlink(missing_ok=True)
    if isinstance(exc, OSError):
        annotate(exc, doing="writing token shards", path=out_dir)


def _run_pool(blocks: Iterable[Block], tokenizer: Tokenizer, workers: int, opts: tuple, consume) -> bool:
    """Encode blocks on `workers` processes, consuming results in input order, with a bounded backlog.
    Returns False when there was nothing left to encode (no pool started)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    first = next(iter(blocks), None) if workers > 1 else None
    if first is None:
        return False
    blocks = itertools.chain([first], blocks)

    # fork where there is one (Linux): workers start at once and work from any caller, stdin scripts and
    # notebooks included. They only run tiktoken / tokenizers (which turns its thread pool off after a fork),
    # never torch, so threads the parent may hold do not matter. Elsewhere spawn (macOS's default).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(
        workers, mp_context=mp.get_context(method), initializer=_worker_init, initargs=(tokenizer.to_json(), *opts)
    )
    pending: deque = deque()
    try:
        for block in blocks:
            pending.append((pool.submit(_worker_encode, block), block.nbytes))
            while len(pending) > 2 * workers:
                future, nbytes = pending.popleft()
                consume(future.result(), nbytes)
        while pending:
            future, nbytes = pending.popleft()
            consume(future.result(), nbytes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return True


def prepare_records(
    records: Iterable[dict],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    source: str = "",
    test_fraction: float = 0.0,
) -> dict:
    """Tokenize in-memory records ({"text", optional "bits"}) into train/val(/test) shards, in-process."""
    src = RecordSource(records, description=source or "records")
    return prepare_source(
        src, tokenizer, out_dir, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, workers=1,
        overwrite=True,
    )  # fmt: skip


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
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    for split, info in meta.get("splits", {}).items():
        for shard in info["shards"]:
            shard_path = data_dir / shard["file"]
            if not shard_path.is_file():
                raise JojoError(
                    f"shard {shard['file']} of split '{split}' is missing in {data_dir}; re-run `jojo prepare`"
                )
            if shard_path.stat().st_size != shard["tokens"] * itemsize:
                raise JojoError(
                    f"shard {shard['file']} of split '{split}' in {data_dir} has the wrong size (truncated "
                    "copy?); re-run `jojo prepare`"
                )
    return meta


# ---- the whole `jojo prepare` ------------------------------------------------------------------------
TOKENIZER_SAMPLE_MB = 100


def sample_texts(source: Source, max_bytes: int) -> Iterator[str]:
    """The first `max_bytes` of documents (whole documents; at least one)."""
    seen = 0
    for rec in source.records():
        yield rec["text"]
        seen += len(rec["text"])
        if seen >= max_bytes:
            return


def _train_job(source: Source, vocab_size: int, max_bytes: int, max_docs: int) -> tuple[str, int]:
    from jojo.tokenizer import train_tokenizer

    texts = sample_texts(source, max_bytes)
    if max_docs:
        texts = itertools.islice(texts, max_docs)
    seen = [0]

    def counted() -> Iterator[str]:
        for text in texts:
            seen[0] += len(text)
            yield text

    return train_tokenizer(counted(), vocab_size).to_json(), seen[0]


def _train_child(conn, job: tuple) -> None:
    try:
        conn.send(("ok", _train_job(*job)))
    except BaseException as exc:  # hand every failure, JojoError included, back to the parent
        conn.send(("error", exc if isinstance(exc, JojoError) else RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


def train_on_sample(source: Source, vocab_size: int, max_bytes: int, max_docs: int = 0) -> tuple[Tokenizer, int]:
    """Train a tokenizer on the first `max_bytes` of `source`; returns it and the characters it saw.

    BPE training memory grows with the sample's distinct words (up to ~0.9 GB for 100 MB of text with 3M
    distinct words, measured), and glibc keeps freed memory: so the training runs in a forked child process
    that exits, and the reader and the encoding workers (forked later) never carry that heap. Where there is
    no fork (macOS, Windows), it runs in-process.
    """
    import multiprocessing as mp

    job = (source, vocab_size, max_bytes, max_docs)
    if "fork" not in mp.get_all_start_methods():
        text, seen = _train_job(*job)
    else:
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_train_child, args=(child, job), daemon=True)
        proc.start()
        child.close()
        try:
            status, payload = parent.recv()
        except EOFError:
            proc.join()
            raise JojoError(f"tokenizer training died (exit code {proc.exitcode}; out of memory?)") from None
        finally:
            parent.close()
        proc.join()
        if status == "error":
            raise payload
        text, seen = payload
    from tokenizers import Tokenizer as HFTokenizer

    return Tokenizer(HFTokenizer.from_str(text)), seen


def prepare_corpus(
    source: Source,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | Tokenizer | None = None,
    vocab_size: int = 4096,
    tokenizer_sample_mb: float = TOKENIZER_SAMPLE_MB,
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 0,
    max_docs: int = 0,
    shard_tokens: int = SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = False,
    log=print,
) -> tuple[dict, bool]:
    """`jojo prepare`: (cache check) -> (tokenizer training on a capped sample) -> `prepare_source`.

    Returns (meta, cache_hit). The cache key covers the input's identity (file paths, sizes and mtimes, or
    the hub name), the tokenizer (its hash, or the training settings when Jojo trains it) and every option
    that changes the output; an unchanged re-run returns at once. `overwrite` forces a rebuild.

    Without a tokenizer, one is trained on the first `tokenizer_sample_mb` MB of documents only: BPE merges
    settle long before that on any one corpus, and training memory grows with the sample, not the corpus.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer) if tokenizer else None
    spec = tok.hash if tok else {"train_vocab": vocab_size, "sample_mb": tokenizer_sample_mb}
    options = {"val": val_fraction, "test": test_fraction, "seed": seed, "max_docs": max_docs,
               "shard_tokens": shard_tokens}  # fmt: skip
    try:
        key = make_cache_key(source.fingerprint(), spec, options)
    except JojoError:
        key = None
    if key and not overwrite:
        meta = cached_meta(out_dir, key)
        if meta is not None:
            log(f"cache hit: {out_dir} already holds this corpus prepared with these options (key {key})")
            return meta, True
    if tok is None:
        if not Path(out_dir).is_dir():  # a path that cannot be a folder fails now, not after training a tokenizer
            ensure_dir(out_dir)
        started = time.perf_counter()
        tok, seen = train_on_sample(source, vocab_size, int(tokenizer_sample_mb * 1e6), max_docs)
        log(
            f"trained a tokenizer on {seen / 1e6:.1f} MB of text (at most the first {tokenizer_sample_mb:g} MB): "
            f"{tok.vocab_size} tokens, hash {tok.hash}, {time.perf_counter() - started:.1f} s"
        )
    meta = prepare_source(
        source, tok, out_dir, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, workers=workers,
        max_docs=max_docs, shard_tokens=shard_tokens, cache_key=key, overwrite=overwrite, progress=progress,
    )  # fmt: skip
    return meta, False
