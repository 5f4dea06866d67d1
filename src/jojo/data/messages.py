"""One record -> messages parser, for every reader of conversations (`jojo prepare`'s chat recipes and `jojo sft`).

A record is a JSON object read from JSONL / JSON / Parquet. Three shapes are understood:

- chatml: a list of messages under `messages`, `conversations`, `conversation`, `dialog` or `chat` (or the field
  named by `field`); each message is {"role", "content"} or ShareGPT's {"from", "value"}; role aliases (human,
  gpt, bot, model) map to user / assistant; a bare list of strings alternates user / assistant.
- alpaca: `instruction` (or `prompt`), optional `input` (or `context`), `output` (or `response`, `completion`):
  the user turn is the instruction (+ a blank line + the input), the assistant turn the output.
- qa: `question` (or `query`, `q`) and `answer` (or `a`, `answers`; SQuAD's {"text": [...]} too): one exchange.

`auto` picks alpaca when the record has an instruction/prompt field, qa when it has a question field, else chatml.
Errors are `ValueError`s whose message is the reason; callers add where the record was read (file:line).
"""

from __future__ import annotations

from collections.abc import Iterable

MESSAGE_FORMATS = ("auto", "chatml", "alpaca", "qa")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system", "tool": "tool"}  # fmt: skip
CONVERSATION_FIELDS = ("messages", "conversations", "conversation", "dialog", "chat")


def first_field(obj: dict, names: Iterable[str]):
    """The value of the first of `names` present (not None) in obj; names match case-insensitively."""
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for name in names:
        if name in obj and obj[name] is not None:
            return obj[name]
        if name.lower() in lowered and lowered[name.lower()] is not None:
            return lowered[name.lower()]
    return None


def _fields(obj: dict) -> str:
    return ", ".join(sorted(map(str, obj))[:12])


def _chatml(obj: dict, field: str | None) -> list[dict]:
    turns = first_field(obj, [field] if field else CONVERSATION_FIELDS)
    if turns is None:
        raise ValueError(f"no conversation: no {' / '.join(CONVERSATION_FIELDS)} list (fields: {_fields(obj)})")
    if not isinstance(turns, list):
        raise ValueError("the conversation must be a list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if isinstance(turn, str):  # a bare list of utterances: alternate user / assistant
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn})
            continue
        if not isinstance(turn, dict):
            raise ValueError(f"message {i} is not an object with 'role' and 'content'")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} has no role")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has no string content")
        messages.append({"role": ROLE_ALIASES.get(role.lower(), role), "content": content})
    return messages


def _alpaca(obj: dict) -> list[dict]:
    instruction = first_field(obj, ["instruction", "prompt"])
    extra = first_field(obj, ["input", "context"]) or ""
    output = first_field(obj, ["output", "response", "completion"])
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
        raise ValueError(
            f"an Alpaca record needs string 'instruction' and 'output' (and optional 'input') (fields: {_fields(obj)})"
        )
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _qa(obj: dict) -> list[dict]:
    question = first_field(obj, ["question", "query", "q"])
    if question is None:
        raise ValueError(f"no 'question' in the record (fields: {_fields(obj)})")
    answer = first_field(obj, ["answer", "a", "answers"])
    if isinstance(answer, dict):  # SQuAD: {"text": [...], "answer_start": [...]}
        answer = answer.get("text")
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if answer is None or not str(answer).strip():
        return []  # unanswerable (SQuAD v2): nothing to learn
    return [{"role": "user", "content": str(question)}, {"role": "assistant", "content": str(answer)}]


def detect_format(obj: dict) -> str:
    if first_field(obj, ["instruction", "prompt"]) is not None:
        return "alpaca"
    if first_field(obj, ["question", "query"]) is not None:
        return "qa"
    return "chatml"


def messages_from_record(obj, fmt: str = "auto", field: str | None = None) -> list[dict]:
    """A record -> [{"role", "content"}, ...]; ValueError with the reason when it is malformed.
    An unanswerable qa record gives [] (callers skip it)."""
    if fmt not in MESSAGE_FORMATS:
        raise ValueError(f"unknown conversation format {fmt!r}; choose from {', '.join(MESSAGE_FORMATS)}")
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "auto":
        fmt = "chatml" if field else detect_format(obj)
    if fmt == "alpaca":
        return _alpaca(obj)
    if fmt == "qa":
        return _qa(obj)
    return _chatml(obj, field)
