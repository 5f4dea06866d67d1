"""Chat models: exact-match accuracy of greedy answers against reference answers.

Functions the rest of Jojo calls:

- `chat_exact_match(model, tokenizer, items, *, max_tokens=64, limit=0) -> dict`: `items` is a JSON Lines
  path, or a list of records or of objects with `.question` and `.answer` (and optionally `.kind`), such as
  `jojo.data.synthetic.heldout_questions(...)` (what the quickstart asks). Returns
  {"exact_match": fraction, "correct": int, "n": int, "by_kind": {kind: fraction}, "rows": [{"question",
  "expected", "answer", "ok"[, "kind"]}, ...]}.
- `load_conversations(path, limit=0) -> list[dict]`: the records of a file, checked, errors naming file:line.

A record is a conversation whose last message is the reference answer: {"messages": [..., {"role": "user", ...},
{"role": "assistant", "content": REFERENCE}]} (also "conversations" / ShareGPT from-value), or a question and
its answer ({"question", "answer"}) or an Alpaca record (instruction [+ input] -> output): whatever `jojo sft`
reads (`jojo.data.messages`). An optional "kind" field groups the report.

The model answers every message but the last, rendered with the chat template SFT trains on
(`jojo.tokenizer.encode_chat`, with the assistant header appended), decoding greedily until <|im_end|> or
<|endoftext|> (at most `max_tokens`). An answer counts when it equals the reference after stripping
surrounding whitespace (exact: case and punctuation count).
"""

from __future__ import annotations

import json
from pathlib import Path

from jojo.data.messages import messages_from_record
from jojo.errors import JojoError
from jojo.infer.engine import SamplingConfig, TextGenerator
from jojo.tokenizer import Tokenizer, encode_chat


def _from_record(obj, where: str) -> dict:
    try:
        messages = messages_from_record(obj)
    except ValueError as exc:
        raise JojoError(f"{where}: {exc}") from None
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise JojoError(f"{where}: the last message must be the assistant's reference answer, after a user turn")
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return {"messages": messages[:-1], "reference": messages[-1]["content"], "kind": kind}


def load_conversations(path: str | Path, limit: int = 0) -> list[dict]:
    """Records of a JSON Lines file (or a JSON array) as {"messages", "reference", "kind"}."""
    path = Path(path)
    if not path.is_file():
        raise JojoError(f"conversation file not found: {path}; pass a JSON Lines file of conversations")
    text = path.read_text(encoding="utf-8")
    items = []
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JojoError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        numbered = [(f"{path}: record {i}", r) for i, r in enumerate(records)]
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise JojoError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one object") from None
    for where, obj in numbered:
        items.append(_from_record(obj, where))
        if limit and len(items) >= limit:
            break
    if not items:
        raise JojoError(f"{path} holds no conversations")
    return items


def _normalise(items) -> list[dict]:
    out = []
    for i, item in enumerate(items):
        if hasattr(item, "question") and hasattr(item, "answer"):
            out.append(
                {
                    "messages": [{"role": "user", "content": item.question}],
                    "reference": item.answer,
                    "kind": getattr(item, "kind", None),
                }
            )
        elif isinstance(item, dict) and "reference" in item and "messages" in item:
            out.append(item)
        else:
            out.append(_from_record(item, f"item {i}"))
    return out


def answer(model, tok: Tokenizer, messages: list[dict], max_tokens: int = 64) -> str:
    """The model's greedy answer to a conversation (stripped)."""
    prompt, _ = encode_chat(tok, messages, add_generation_prompt=True)
    block = model.config.block_size
    if len(prompt) >= block:
        prompt = prompt[-(block - 1) :]  # keep the end: the question and the assistant header
    sc = SamplingConfig(max_tokens=max_tokens, temperature=0.0)
    return TextGenerator(model, tok).text(prompt, sc, chat=True).strip()


def chat_exact_match(model, tokenizer: Tokenizer, items, *, max_tokens: int = 64, limit: int = 0) -> dict:
    """Exact-match accuracy of greedy answers (see the module docstring)."""
    records = load_conversations(items, limit) if isinstance(items, str | Path) else _normalise(items)
    if limit:
        records = records[:limit]
    if not records:
        raise JojoError("no conversations to evaluate")
    was_training = model.training
    model.eval()
    rows = []
    try:
        for rec in records:
            got = answer(model, tokenizer, rec["messages"], max_tokens)
            row = {
                "question": rec["messages"][-1]["content"],
                "expected": rec["reference"],
                "answer": got,
                "ok": got == rec["reference"].strip(),
            }
            if rec.get("kind") is not None:
                row["kind"] = rec["kind"]
            rows.append(row)
    finally:
        model.train(was_training)
    by_kind: dict[str, list[bool]] = {}
    for row in rows:
        if "kind" in row:
            by_kind.setdefault(str(row["kind"]), []).append(row["ok"])
    correct = sum(r["ok"] for r in rows)
    return {
        "exact_match": correct / len(rows),
        "correct": correct,
        "n": len(rows),
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "rows": rows,
    }
