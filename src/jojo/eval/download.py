"""`jojo eval download`: fetch the zero-shot tasks from their public sources into one folder, converted to the
JSON Lines formats `jojo.eval.tasks` reads, with a manifest.

Function: `download_tasks(tasks, out, *, urls=None, timeout=20.0, say=print) -> dict` (the manifest).

Sources (one file each, over HTTPS; `urls` overrides any, e.g. with a file:// URL of a copy):

    hellaswag      the official validation set, rowanz/hellaswag data/hellaswag_val.jsonl (10,042 items),
                   converted: query = activity_label + ": " + ctx, choices = endings, gold = label, each text
                   cleaned as lm-evaluation-harness does (" [title]" -> ". ", other [bracketed] markers removed,
                   double spaces made single, stripped)
    arc-easy       mosaicml/llm-foundry scripts/eval/local_data/world_knowledge/arc_easy.jsonl (ARC-Easy test)
    arc-challenge  .../world_knowledge/arc_challenge.jsonl (ARC-Challenge test)
    piqa           .../commonsense_reasoning/piqa.jsonl (PIQA validation)
    winogrande     .../language_understanding/winogrande.jsonl (Winogrande dev)
    lambada        .../language_understanding/lambada_openai.jsonl (LAMBADA, OpenAI's version)

The llm-foundry files are already in the target format; each row is checked (`jojo.eval.tasks.parse_item`) and
only the format's fields are kept. The manifest (`manifest.json`, merged with an earlier one) records per task
the file, its row count and sha256, the source URL and the sha256 of what was downloaded. Without network the
first request fails within `timeout` seconds, with one line naming the task and what to do.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from jojo.errors import JojoError
from jojo.eval.tasks import TASKS, parse_item, resolve_data_dir, split_names, task_spec

_FOUNDRY = "https://raw.githubusercontent.com/mosaicml/llm-foundry/main/scripts/eval/local_data"
SOURCES = {
    "hellaswag": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "arc-easy": f"{_FOUNDRY}/world_knowledge/arc_easy.jsonl",
    "arc-challenge": f"{_FOUNDRY}/world_knowledge/arc_challenge.jsonl",
    "piqa": f"{_FOUNDRY}/commonsense_reasoning/piqa.jsonl",
    "winogrande": f"{_FOUNDRY}/language_understanding/winogrande.jsonl",
    "lambada": f"{_FOUNDRY}/language_understanding/lambada_openai.jsonl",
}
MANIFEST = "manifest.json"
_BRACKETS = re.compile(r"\[.*?\]")


def clean_hellaswag(text: str) -> str:
    """lm-evaluation-harness's HellaSwag text cleaning (WikiHow's bracketed section markers)."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETS.sub("", text)
    return text.replace("  ", " ")


def convert_hellaswag(obj: dict, where: str) -> dict:
    """One record of the official HellaSwag file -> {"query", "choices", "gold"}."""
    try:
        query = clean_hellaswag(f"{obj['activity_label']}: {obj['ctx']}")
        choices = [clean_hellaswag(e) for e in obj["endings"]]
        gold = int(obj["label"])
    except (KeyError, TypeError, ValueError) as exc:
        raise JojoError(f"{where}: not a HellaSwag record ({type(exc).__name__}: {exc})") from None
    return parse_item(TASKS["hellaswag"].kind, {"query": query, "choices": choices, "gold": gold}, where)


def fetch(url: str, timeout: float) -> bytes:
    """The bytes at `url` (http(s) or file://); a one-line JojoError when it cannot be had."""
    request = urllib.request.Request(url, headers={"User-Agent": "jojo-eval-download"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise JojoError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JojoError(
            f"cannot download {url} ({reason}): no network? Run `jojo eval download` on a machine with internet "
            "and copy the folder here (then --data-dir DIR or JOJO_EVAL_DIR=DIR)"
        ) from None


def convert(name: str, raw: bytes, source: str) -> list[dict]:
    """Rows of a downloaded file in the task's format."""
    spec = task_spec(name)
    rows = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JojoError(f"{source} is not UTF-8 text; is it the right file?") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JojoError(f"{where}: not valid JSON ({exc.msg})") from None
        rows.append(convert_hellaswag(obj, where) if spec.name == "hellaswag" else parse_item(spec.kind, obj, where))
    if not rows:
        raise JojoError(f"{source} holds no rows")
    return rows


def download_tasks(
    tasks,
    out: str | Path | None = None,
    *,
    urls: dict[str, str] | None = None,
    timeout: float = 20.0,
    say: Callable[[str], None] = print,
) -> dict:
    """Fetch, convert and write each task (all six when `tasks` is None); returns the manifest."""
    names = [task_spec(n).name for n in split_names(tasks)] if tasks is not None else list(TASKS)
    if not names:
        raise JojoError(f"no tasks given; choose from {', '.join(TASKS)}")
    folder = resolve_data_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    manifest = {"tasks": {}}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            pass  # a corrupt manifest is rewritten from what is downloaded now
    manifest.setdefault("tasks", {})
    for name in dict.fromkeys(names):
        spec = TASKS[name]
        url = (urls or {}).get(name, SOURCES[name])
        say(f"{name}: {url}")
        raw = fetch(url, timeout)
        rows = convert(name, raw, url)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        target = folder / spec.files[0]
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        manifest["tasks"][name] = {
            "file": target.name,
            "kind": spec.kind,
            "rows": len(rows),
            "sha256": hashlib.sha256(data).hexdigest(),
            "source": url,
            "source_sha256": hashlib.sha256(raw).hexdigest(),
            "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        say(f"  {len(rows):,} rows -> {target}")
    return manifest
