"""Text sources: whatever the user brings, streamed as documents in bounded memory.

A source is a file, a folder (every file under it, sorted), a glob, a Hugging Face dataset streamed from the
hub, or an in-memory iterator of records (Jojo's embedded corpus). Files may be compressed (`.gz`, `.zst`:
`corpus.jsonl.gz` is JSONL inside gzip). Formats, from the name once the compression suffix is removed, or
forced with `fmt`:

- text (`.txt`, `.md`, anything else): documents split by `split_on`:
  `blank` (blank lines), `eot` (`<|endoftext|>`), `line` (one per line), `file` (the whole file), any other
  string (that separator), or `auto`: `eot` when the first 2 MB of the file contain `<|endoftext|>`, else `blank`;
- JSONL (`.jsonl`, `.ndjson`, and `.json` files that start with `{`): one JSON object per line;
- JSON (`.json`): an array of objects or strings, parsed incrementally (a 10 GB array costs no more RAM
  than its largest element);
- Parquet (`.parquet`): read by row group, only the columns the format needs;
- CSV / TSV (`.csv`, `.tsv`): a header row, then one record per row.

A record (a dict) becomes a document through a `TextFormat`: a field (`text` by default), a template over
fields (`"{instruction}\\n{output}"`), or one of the chat/QA renderings the recipes use (ChatML via
`jojo.tokenizer.render_chat`).

Reading is split in two for speed: `Source.blocks()` cuts the input into blocks of a few MB aligned on
document boundaries (cheap), and `parse_block` turns a block into documents (the costly part: splitting,
JSON parsing). `jojo prepare` runs `parse_block` in its worker processes, next to the encoder.
"""

from __future__ import annotations

import csv
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import re
import string
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from jojo.data.messages import first_field, messages_from_record
from jojo.errors import JojoError
from jojo.tokenizer import EOT, render_chat

TEXT_FIELD = "text"
EMBEDDED = "embedded"  # the name of Jojo's generated corpus as a source
BLOCK_CHARS = 2 << 20  # a block is ~2 MB of text: big enough to amortise IPC, small enough for a smooth bar
AUTO_PROBE_CHARS = 2 << 20  # `--split-on auto` looks for <|endoftext|> in this much of a file
FORMATS = ("auto", "text", "jsonl", "json", "parquet", "csv")
HUB_TIMEOUT_S = 5.0
_BLANK_LINES = re.compile(r"\n\s*\n")
_COMPRESSION = (".gz", ".zst", ".zstd")


# ---- records -> documents ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TextFormat:
    """How a record (a dict) becomes one document's text.

    kind: `field` (record[field]), `template` (`template.format(**record)`), or a rendering:
      `chatml`     a list of {"role", "content"} messages (or ShareGPT {"from", "value"}) in `field`
                   (default: the first of messages / conversations / conversation / dialog found), as ChatML;
      `alpaca`     instruction (+ input) -> user, output -> assistant, as ChatML;
      `qa`         question -> user, answer (`answer`, `answers.text[0]`, `answers[0]`) -> assistant, as ChatML;
      `dialog`     a list of utterances in `field` (default `dialog`), alternately user and assistant, as ChatML;
      `definition` "word: definition" (keys word/term/headword and definition/gloss/meaning, any case).
    A record that yields no text (empty or whitespace) is skipped.
    """

    kind: str = "field"
    field: str = TEXT_FIELD
    template: str | None = None

    def __post_init__(self):
        if self.kind not in _RENDERERS and self.kind not in ("field", "template"):
            raise JojoError(f"unknown text format '{self.kind}'; choose from field, template, {', '.join(_RENDERERS)}")
        if self.kind == "template":
            if not self.template:
                raise JojoError("a template format needs --template, e.g. '{instruction}\\n{output}'")
            try:
                names = [n for _, n, _, _ in string.Formatter().parse(self.template) if n is not None]
            except ValueError as exc:
                raise JojoError(f"bad --template {self.template!r}: {exc}") from None
            if not names or any(not n or not n.isidentifier() for n in names):
                raise JojoError(
                    f"bad --template {self.template!r}: use plain {{field}} names, e.g. '{{instruction}}\\n{{output}}'"
                )

    def columns(self) -> list[str] | None:
        """The record keys this format reads (None: it may read any); Parquet reads only these columns."""
        if self.kind == "field":
            return [self.field]
        if self.kind == "template":
            return sorted({n for _, n, _, _ in string.Formatter().parse(self.template or "") if n})
        return None

    def render(self, obj, where: str) -> str | None:
        if isinstance(obj, str) and self.kind == "field":
            return obj
        if not isinstance(obj, dict):
            raise JojoError(f"{where}: expected a JSON object (or a string), got {type(obj).__name__}")
        if self.kind == "field":
            value = obj.get(self.field)
            if not isinstance(value, str):
                keys = ", ".join(sorted(map(str, obj))[:12])
                raise JojoError(
                    f"{where}: no string field '{self.field}' (fields: {keys}); set --field, or --template "
                    "to combine fields"
                )
            return value
        if self.kind == "template":
            values = {k: ("" if v is None else v) for k, v in obj.items()}
            try:
                return self.template.format_map(values)
            except KeyError as exc:
                keys = ", ".join(sorted(map(str, obj))[:12])
                raise JojoError(f"{where}: the template needs field {exc} (fields: {keys})") from None
        return _RENDERERS[self.kind](obj, self.field if self.field != TEXT_FIELD else None, where)


def _need(value, what: str, where: str, obj: dict):
    if value is None:
        keys = ", ".join(sorted(map(str, obj))[:12])
        raise JojoError(f"{where}: no {what} in the record (fields: {keys})")
    return value


def _as_chat(fmt: str):
    """A renderer through the one record -> messages parser (`jojo.data.messages`, which `jojo sft` uses too)."""

    def render(obj: dict, field_name: str | None, where: str) -> str:
        try:
            messages = messages_from_record(obj, fmt, field_name)
        except ValueError as exc:
            raise JojoError(f"{where}: {exc}") from None
        return render_chat(messages) if messages else ""

    return render


_render_chatml = _as_chat("chatml")
_render_alpaca = _as_chat("alpaca")
_render_qa = _as_chat("qa")


def _render_dialog(obj: dict, field_name: str | None, where: str) -> str:
    return _render_chatml(obj, field_name or "dialog", where)


def _render_definition(obj: dict, field_name: str | None, where: str) -> str:
    word = _need(first_field(obj, ["word", "term", "headword", "lemma"]), "'word'", where, obj)
    definition = _need(first_field(obj, ["definition", "gloss", "meaning", "definitions"]), "'definition'", where, obj)
    if isinstance(definition, list):
        definition = "; ".join(map(str, definition))
    return f"{str(word).strip()}: {str(definition).strip()}"


_RENDERERS = {
    "chatml": _render_chatml,
    "alpaca": _render_alpaca,
    "qa": _render_qa,
    "dialog": _render_dialog,
    "definition": _render_definition,
}


# ---- blocks ------------------------------------------------------------------------------------------
@dataclass
class Block:
    """A piece of input aligned on document boundaries.

    kind `text`: raw text to split with `split_on`; `jsonl`: raw JSON lines (first line number `line`);
    `docs`: already-made documents `(text, bits or None)`. `nbytes`: how far through the input this block
    takes the reader (bytes of the files as stored), for the progress bar.
    """

    kind: str
    payload: object
    where: str = ""
    nbytes: int = 0
    split_on: str = "blank"
    fmt: TextFormat = field(default_factory=TextFormat)
    line: int = 1


def split_text(text: str, split_on: str) -> list[str]:
    """Documents of a text block: parts between separators, stripped of surrounding newlines, non-empty."""
    if split_on == "file":
        parts = [text]
    elif split_on == "blank":
        parts = _BLANK_LINES.split(text)
    elif split_on == "line":
        parts = text.split("\n")
    else:
        parts = text.split(EOT if split_on == "eot" else split_on)
    docs = []
    for part in parts:
        part = part.strip("\n")
        if part.strip():
            docs.append(part)
    return docs


def parse_block(block: Block) -> list[tuple[str, float | None]]:
    """The documents of a block, in order, each with its information content in bits when known."""
    if block.kind == "docs":
        return block.payload
    if block.kind == "text":
        return [(doc, None) for doc in split_text(block.payload, block.split_on)]
    if block.kind == "jsonl":
        docs = []
        for offset, line in enumerate(block.payload.split("\n")):
            if not line.strip():
                continue
            where = f"{block.where}:{block.line + offset}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise JojoError(f"{where}: not valid JSON; each line of a .jsonl file must be one object") from None
            text = block.fmt.render(obj, where)
            if text and text.strip():
                docs.append((text, _bits(obj)))
        return docs
    raise ValueError(f"unknown block kind {block.kind}")


def _bits(obj) -> float | None:
    bits = obj.get("bits") if isinstance(obj, dict) else None
    return float(bits) if isinstance(bits, int | float) and not isinstance(bits, bool) else None


# ---- sources -----------------------------------------------------------------------------------------
class Source:
    """A stream of documents. `blocks()` yields `Block`s; `records()` the parsed documents, in-process."""

    description = ""
    total_bytes: int | None = None  # size of the input as stored, when known (progress ETA)

    def blocks(self) -> Iterator[Block]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the input, for the prepare cache (never the content itself)."""
        raise NotImplementedError

    def records(self) -> Iterator[dict]:
        for block in self.blocks():
            for text, bits in parse_block(block):
                yield {TEXT_FIELD: text} if bits is None else {TEXT_FIELD: text, "bits": bits}


class RecordSource(Source):
    """Records from Python (`{"text": ..., "bits": ...}` dicts), batched into `docs` blocks. `records` is an
    iterable, or a function returning a fresh iterator (then the source can be read more than once, as
    `jojo prepare` does when it trains a tokenizer on a sample first)."""

    def __init__(
        self, records: Iterable[dict] | Callable[[], Iterable[dict]], fingerprint: dict | None = None,
        description: str = "records",
    ):  # fmt: skip
        self._records = records
        self._fingerprint = fingerprint
        self.description = description

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            raise JojoError("an in-memory record source has no fingerprint to cache on")
        return self._fingerprint

    def blocks(self) -> Iterator[Block]:
        docs, size = [], 0
        records = self._records() if callable(self._records) else self._records
        for i, rec in enumerate(records):
            text = rec.get(TEXT_FIELD) if isinstance(rec, dict) else rec
            if not isinstance(text, str):
                raise JojoError(f"record {i} of {self.description} has no string 'text'")
            if not text.strip():
                continue
            docs.append((text, _bits(rec)))
            size += len(text)
            if size >= BLOCK_CHARS:
                yield Block("docs", docs, nbytes=size)
                docs, size = [], 0
        if docs:
            yield Block("docs", docs, nbytes=size)


def expand_paths(source: str | Path) -> list[Path]:
    source = str(source)
    if any(ch in source for ch in "*?["):
        paths = [Path(p) for p in sorted(globlib.glob(source, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise JojoError(f"no files match {source}; check the pattern")
        return paths
    path = Path(source)
    if path.is_dir():
        paths = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
        )
        if not paths:
            raise JojoError(f"directory {path} holds no files; point at a folder with text files")
        return paths
    if not path.is_file():
        raise JojoError(f"corpus not found: {path}; pass an existing file, folder or glob")
    return [path]


def file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    return "text"


class _Counted(io.RawIOBase):
    """A raw file that counts the bytes read from disk (the progress of a compressed stream)."""

    def __init__(self, fh):
        self._fh, self.count = fh, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._fh.readinto(buf)
        self.count += n or 0
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_binary(path: Path) -> tuple[io.BufferedIOBase, _Counted]:
    raw = _Counted(open(path, "rb", buffering=0))
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20), mode="rb"), raw
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raise JojoError(f"{path} is zstd-compressed: `pip install zstandard` to read it") from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, 1 << 20), raw
    return io.BufferedReader(raw, 1 << 20), raw


class FileSource(Source):
    """Files, folders and globs in any of the formats above."""

    def __init__(self, location: str | Path, fmt: str = "auto", split_on: str = "auto", text: TextFormat | None = None):
        if fmt not in FORMATS:
            raise JojoError(f"unknown --format '{fmt}'; choose from {', '.join(FORMATS)}")
        if not split_on:
            raise JojoError("--split-on needs a mode (blank, eot, line, file) or a separator string")
        self.location = str(location)
        self.paths = expand_paths(location)
        self.fmt, self.split_on = fmt, split_on
        self.text = text or TextFormat()
        self.total_bytes = sum(p.stat().st_size for p in self.paths)
        self.description = self.location

    def fingerprint(self) -> dict:
        files = []
        for p in self.paths:
            st = p.stat()
            files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        return {"files": files, "format": self.fmt, "split_on": self.split_on, "text": self.text.__dict__}

    def blocks(self) -> Iterator[Block]:
        for path in self.paths:
            fmt = self.fmt if self.fmt != "auto" else file_format(path)
            reader = {"text": self._text, "jsonl": self._jsonl, "json": self._json, "parquet": self._parquet,
                      "csv": self._csv}[fmt]  # fmt: skip
            try:
                yield from reader(path)
            except UnicodeDecodeError:
                raise JojoError(f"{path} is not UTF-8 text; convert it (iconv) or pass --format") from None
            except (OSError, EOFError) as exc:
                if isinstance(exc, FileNotFoundError):
                    raise
                raise JojoError(f"cannot read {path}: {exc}") from None

    # -- text
    def _text(self, path: Path) -> Iterator[Block]:
        binary, raw = _open_binary(path)
        with io.TextIOWrapper(binary, encoding="utf-8") as fh:
            mode, sent, buf = self.split_on, 0, ""
            if mode == "file":
                yield Block("text", fh.read(), str(path), raw.count, "file")
                return
            while True:
                if mode == "auto":  # decide on the first 2 MB, whatever the block size
                    chunk = fh.read(max(BLOCK_CHARS, AUTO_PROBE_CHARS))
                    mode = "eot" if EOT in chunk else "blank"
                else:
                    chunk = fh.read(BLOCK_CHARS)
                buf += chunk
                if not chunk:
                    if buf.strip():
                        yield Block("text", buf, str(path), raw.count - sent, mode)
                    return
                cut = _last_boundary(buf, mode)
                if cut > 0:
                    yield Block("text", buf[:cut], str(path), raw.count - sent, mode)
                    sent, buf = raw.count, buf[cut:]

    # -- JSON lines
    def _jsonl(self, path: Path) -> Iterator[Block]:
        binary, raw = _open_binary(path)
        with io.TextIOWrapper(binary, encoding="utf-8") as fh:
            yield from self._jsonl_stream(fh, raw, path, "")

    def _jsonl_stream(self, fh, raw: _Counted, path: Path, buf: str) -> Iterator[Block]:
        line, sent = 1, 0
        while True:
            chunk = fh.read(BLOCK_CHARS)
            buf += chunk
            cut = len(buf) if not chunk else buf.rfind("\n") + 1
            if cut > 0:
                piece, buf = buf[:cut], buf[cut:]
                yield Block("jsonl", piece, str(path), raw.count - sent, fmt=self.text, line=line)
                sent = raw.count
                line += piece.count("\n")
            if not chunk:
                return

    # -- JSON array
    def _json(self, path: Path) -> Iterator[Block]:
        binary, raw = _open_binary(path)
        with io.TextIOWrapper(binary, encoding="utf-8") as fh:
            head = fh.read(BLOCK_CHARS)
            stripped = head.lstrip()
            if stripped.startswith("{"):  # JSON lines saved as .json, as many exports do
                yield from self._jsonl_stream(fh, raw, path, head)
                return
            if not stripped.startswith("["):
                raise JojoError(f"{path}: expected a JSON array of documents (or one JSON object per line)")
            docs, size, sent = [], 0, 0
            for i, obj in _iter_json_array(fh, head, path):
                text = self.text.render(obj, f"{path}[{i}]")
                if text and text.strip():
                    docs.append((text, _bits(obj)))
                    size += len(text)
                if size >= BLOCK_CHARS:
                    yield Block("docs", docs, str(path), raw.count - sent)
                    docs, size, sent = [], 0, raw.count
            yield Block("docs", docs, str(path), raw.count - sent)

    # -- Parquet
    def _parquet(self, path: Path) -> Iterator[Block]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise JojoError(f"{path} is Parquet: `pip install pyarrow` to read it") from None
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid
            raise JojoError(f"{path}: not a readable Parquet file ({exc})") from None
        names = set(pf.schema_arrow.names)
        wanted = self.text.columns()
        if wanted is not None:
            missing = [c for c in wanted if c not in names]
            if missing:
                raise JojoError(
                    f"{path}: no column {missing[0]!r} (columns: {', '.join(sorted(names)[:12])}); set --field "
                    "or --template"
                )
        size, rows_total = path.stat().st_size, max(pf.metadata.num_rows, 1)
        rows_done, reported, index = 0, 0, 0
        for batch in pf.iter_batches(batch_size=4096, columns=wanted):
            docs = []
            for obj in batch.to_pylist():
                text = self.text.render(obj, f"{path}[row {index}]")
                index += 1
                if text and text.strip():
                    docs.append((text, _bits(obj)))
            rows_done += batch.num_rows
            progress = size * rows_done // rows_total
            yield Block("docs", docs, str(path), progress - reported)
            reported = progress

    # -- CSV / TSV
    def _csv(self, path: Path) -> Iterator[Block]:
        binary, raw = _open_binary(path)
        delimiter = "\t" if ".tsv" in path.name.lower() else ","
        with io.TextIOWrapper(binary, encoding="utf-8", newline="") as fh:
            docs, size, sent = [], 0, 0
            for i, obj in enumerate(csv.DictReader(fh, delimiter=delimiter)):
                text = self.text.render(obj, f"{path}:{i + 2}")
                if text and text.strip():
                    docs.append((text, None))
                    size += len(text)
                if size >= BLOCK_CHARS:
                    yield Block("docs", docs, str(path), raw.count - sent)
                    docs, size, sent = [], 0, raw.count
            yield Block("docs", docs, str(path), raw.count - sent)


def _last_boundary(buf: str, mode: str) -> int:
    """Where to cut `buf` so that the cut falls right after a document separator that lies wholly inside
    it (reading more could not change it); 0 when there is none yet."""
    if mode == "line":
        return buf.rfind("\n") + 1
    if mode == "blank":
        # A separator is a whitespace run holding two newlines; it ends at the run's last newline. Only a run
        # followed by a non-space inside the buffer is complete, so search up to the last non-space.
        end = len(buf.rstrip())
        for window in (1 << 16, len(buf)):
            best = 0
            for m in _BLANK_LINES.finditer(buf, max(0, end - window), end):
                best = m.end()
            if best:
                return best
        return 0
    sep = EOT if mode == "eot" else mode
    at = buf.rfind(sep)
    return at + len(sep) if at >= 0 else 0


def _iter_json_array(fh, head: str, path: Path) -> Iterator[tuple[int, object]]:
    """The elements of a top-level JSON array, read incrementally from a text stream."""
    decoder = json.JSONDecoder()
    buf, eof, chunk = head, False, BLOCK_CHARS
    pos = buf.index("[") + 1
    index = 0

    def more() -> bool:
        nonlocal buf, pos, eof, chunk
        if eof:
            return False
        data = fh.read(chunk)
        chunk = min(chunk * 2, 64 << 20)  # an element larger than the buffer: grow geometrically
        eof = not data
        buf, pos = buf[pos:] + data, 0
        return not eof

    def skip_ws() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return

    expect_value = True
    while True:
        skip_ws()
        if pos >= len(buf):
            raise JojoError(f"{path}: the JSON array is not closed (truncated file?)")
        ch = buf[pos]
        if ch == "]" and (expect_value and index == 0 or not expect_value):
            return
        if not expect_value:
            if ch != ",":
                raise JojoError(f"{path}: expected ',' or ']' after element {index - 1} of the JSON array")
            pos += 1
            expect_value = True
            continue
        try:
            obj, end = decoder.raw_decode(buf, pos)
            if end == len(buf) and not eof:  # a number may continue in the next read
                raise json.JSONDecodeError("incomplete", buf, end)
        except json.JSONDecodeError as exc:
            if more():
                continue
            raise JojoError(f"{path}: element {index} of the JSON array is not valid JSON ({exc.msg})") from None
        pos = end
        yield index, obj
        index += 1
        expect_value = False


# ---- Hugging Face hub --------------------------------------------------------------------------------
def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_hub(name: str, timeout: float | None = None) -> None:
    """Fail within `timeout` seconds, with the way out, when the hub cannot be reached.

    `datasets` retries for minutes when offline; this asks the hub's API for the dataset first, in a thread
    so that even a hanging DNS lookup cannot hold us longer than the timeout. A 404 raises `DatasetMissing`.
    """
    local = "download it where there is internet and pass --source PATH (a .txt/.jsonl/.parquet file or folder)"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "",
        "0",
    ):
        raise JojoError(f"the Hugging Face hub is switched off (HF_HUB_OFFLINE) so '{name}' cannot stream; {local}")
    import urllib.error
    import urllib.request

    timeout = HUB_TIMEOUT_S if timeout is None else timeout
    result: dict = {}

    def probe() -> None:
        try:
            req = urllib.request.Request(f"{_hub_endpoint()}/api/datasets/{name}", method="GET")
            token = os.environ.get("HF_TOKEN")
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                result["status"] = resp.status
        except urllib.error.HTTPError as exc:
            result["status"] = exc.code
        except Exception as exc:  # URLError, timeouts, DNS failures: all mean "unreachable"
            result["error"] = exc

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    if "status" not in result:
        reason = result.get("error")
        reason = getattr(reason, "reason", reason) or f"no answer in {timeout:.0f} s"
        raise JojoError(f"cannot reach the Hugging Face hub ({reason}) to stream '{name}'; {local}")
    if result["status"] == 404:
        raise DatasetMissing(f"dataset '{name}' does not exist on the Hugging Face hub; check the name")


class DatasetMissing(JojoError):
    """The hub answered that the dataset does not exist (recipes may fall back to another)."""


class HubSource(Source):
    """A Hugging Face dataset, streamed (nothing is downloaded up front)."""

    def __init__(self, name: str, subset: str | None = None, split: str = "train", text: TextFormat | None = None):
        self.name, self.subset, self.split = name, subset, split
        self.text = text or TextFormat()
        self.description = f"hf:{name}" + (f"/{subset}" if subset else "") + f"[{split}]"

    def fingerprint(self) -> dict:
        # A hub dataset is identified by name, subset and split; pass --overwrite to fetch a newer revision.
        return {"hub": self.name, "subset": self.subset, "split": self.split, "text": self.text.__dict__}

    def check(self) -> None:
        check_hub(self.name)

    def blocks(self) -> Iterator[Block]:
        self.check()
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
        try:
            import datasets
        except ImportError:
            raise JojoError("streaming from the hub needs `pip install datasets`; or pass --source PATH") from None
        try:
            stream = datasets.load_dataset(self.name, self.subset, split=self.split, streaming=True)
            docs, size, index = [], 0, 0
            for obj in stream:
                text = self.text.render(obj, f"{self.description} row {index}")
                index += 1
                if text and text.strip():
                    docs.append((text, None))
                    size += len(text.encode("utf-8"))
                if size >= BLOCK_CHARS:
                    yield Block("docs", docs, self.description, size)
                    docs, size = [], 0
            yield Block("docs", docs, self.description, size)
        except JojoError:
            raise
        except Exception as exc:  # datasets raises many types; the user needs the first line
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise JojoError(f"cannot stream {self.description}: {first}") from None


# ---- convenience -------------------------------------------------------------------------------------
def iter_records(
    source: str | Path,
    field: str = TEXT_FIELD,
    *,
    fmt: str = "auto",
    split_on: str = "auto",
    template: str | None = None,
) -> Iterator[dict]:
    """Yield {"text": ..., ["bits": ...]} for every document under `source` (a file, folder or glob)."""
    text = TextFormat("template", template=template) if template else TextFormat("field", field)
    return FileSource(source, fmt, split_on, text).records()


def iter_texts(source: str | Path, field: str = TEXT_FIELD, **kw) -> Iterator[str]:
    for rec in iter_records(source, field, **kw):
        yield rec[TEXT_FIELD]


def content_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def embedded_source(n_docs: int = 20000, seed: int = 0) -> RecordSource:
    """Jojo's own generated corpus (stories + chats), each document carrying its information content in bits."""
    from jojo.data import synthetic

    def records() -> Iterator[dict]:
        for doc in synthetic.generate_corpus(n_docs, seed=seed):
            yield {TEXT_FIELD: doc.text, "bits": doc.bits}

    # The generator's code is part of the input's identity: a changed grammar must not hit an old cache.
    fingerprint = {"embedded": n_docs, "seed": seed, "generator": content_hash(synthetic.__file__)}
    return RecordSource(records, fingerprint, description=EMBEDDED)
