"""Text sources: turn a path into an iterator of documents (plain strings).

Formats recognised by extension:
- ``.txt`` / ``.md`` (and anything else textual): documents separated by ``<|endoftext|>`` when the file
  contains it, else by blank lines;
- ``.jsonl``: one JSON object per line, the document in ``text`` (or ``field``);
- ``.json``: a JSON array of such objects (or of strings);
- a directory or a glob: every matching file, in sorted order.

Each document may carry metadata (the synthetic corpus carries ``bits``); `iter_records` yields dicts with at
least ``text``.
"""

from __future__ import annotations

import glob as globlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from jojo.errors import JojoError
from jojo.tokenizer import EOT

TEXT_FIELD = "text"
_BLANK_LINES = re.compile(r"\n\s*\n")


def expand_paths(source: str | Path) -> list[Path]:
    source = str(source)
    if any(ch in source for ch in "*?["):
        paths = [Path(p) for p in sorted(globlib.glob(source, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise JojoError(f"no files match {source}; check the pattern")
        return paths
    path = Path(source)
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not paths:
            raise JojoError(f"directory {path} holds no files; point at a folder with text files")
        return paths
    if not path.is_file():
        raise JojoError(f"corpus not found: {path}; pass an existing file, folder or glob")
    return [path]


def _split_text(text: str) -> Iterator[str]:
    parts = text.split(EOT) if EOT in text else _BLANK_LINES.split(text)
    for part in parts:
        part = part.strip("\n")
        if part.strip():
            yield part


def _json_record(obj, path: Path, where: str, field: str) -> dict:
    if isinstance(obj, str):
        return {TEXT_FIELD: obj}
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise JojoError(
            f"{path}{where}: expected an object with a string '{field}' field; set --field to the right key"
        )
    rec = dict(obj)
    rec[TEXT_FIELD] = obj[field]
    return rec


def iter_records(source: str | Path, field: str = TEXT_FIELD) -> Iterator[dict]:
    """Yield {"text": ..., **metadata} for every document under `source`."""
    for path in expand_paths(source):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        raise JojoError(
                            f"{path}:{lineno}: not valid JSON; each line of a .jsonl file must be one object"
                        ) from None
                    rec = _json_record(obj, path, f":{lineno}", field)
                    if rec[TEXT_FIELD].strip():
                        yield rec
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise JojoError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            if not isinstance(data, list):
                raise JojoError(f"{path}: expected a JSON array of documents")
            for i, obj in enumerate(data):
                rec = _json_record(obj, path, f"[{i}]", field)
                if rec[TEXT_FIELD].strip():
                    yield rec
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise JojoError(f"{path} is not UTF-8 text; convert it or pass a text/JSONL file") from None
            for doc in _split_text(text):
                yield {TEXT_FIELD: doc}


def iter_texts(source: str | Path, field: str = TEXT_FIELD) -> Iterator[str]:
    for rec in iter_records(source, field):
        yield rec[TEXT_FIELD]
