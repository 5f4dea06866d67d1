"""Byte-level BPE: train, save, load, and the one chat template.

Training uses Hugging Face `tokenizers`; the result is a standard `tokenizer.json` (no pickles) that
`transformers` reads as is. Byte-level pre-tokenization means every Unicode string encodes and decodes back
exactly. `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` are special tokens: each is one id, never split,
and never produced by merges.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from jojo.errors import JojoError

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)
TOKENIZER_FILE = "tokenizer.json"


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The one chat template (ChatML), used by SFT, chat, the server and the exported Jinja template:

    <|im_start|>{role}\\n{content}<|im_end|>\\n   for each message,
    <|im_start|>assistant\\n                      appended when add_generation_prompt.
    """
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text


def parse_chatml(text: str) -> list[dict]:
    """Inverse of `render_chat`; raises ValueError on malformed ChatML."""
    messages = []
    pos = 0
    while pos < len(text):
        if not text.startswith(IM_START, pos):
            raise ValueError(f"expected {IM_START} at offset {pos}")
        head = pos + len(IM_START)
        newline = text.find("\n", head)
        end = text.find(IM_END + "\n", head)
        if newline < 0 or end < 0 or newline > end:
            raise ValueError(f"unterminated message at offset {pos}")
        content = text[newline + 1 : end]
        if IM_START in content:
            raise ValueError(f"message at offset {pos} is not closed before the next one")
        messages.append({"role": text[head:newline], "content": content})
        pos = end + len(IM_END) + 1
    return messages


# The same template in Jinja, for Hugging Face's `apply_chat_template` (exported with the model).
CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with Jojo's special tokens and a content hash."""

    def __init__(self, tok, source: str = ""):
        self._tok = tok
        self.source = source
        missing = [s for s in SPECIAL_TOKENS if tok.token_to_id(s) is None]
        if missing:
            raise JojoError(
                f"tokenizer {source or ''} lacks special tokens {missing}; retrain it with `jojo tokenizer train`"
            )
        self.eot_id = tok.token_to_id(EOT)
        self.im_start_id = tok.token_to_id(IM_START)
        self.im_end_id = tok.token_to_id(IM_END)
        self.special_ids = {self.eot_id, self.im_start_id, self.im_end_id}

    # ---- io ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json, or the tokenizer.json inside a directory."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise JojoError(f"tokenizer not found: {path}; train one with `jojo tokenizer train` or pass its path")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise JojoError(
                f"cannot read tokenizer {path}: {str(exc).splitlines()[0]}; is it a tokenizer.json?"
            ) from None
        return cls(tok, str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    def to_json(self) -> str:
        return self._tok.to_str(pretty=True)

    @property
    def hash(self) -> str:
        """Content hash of the vocabulary, merges and special tokens: two tokenizers with the same hash
        give the same ids. Checkpoints and prepared shards record it."""
        data = json.loads(self._tok.to_str())
        canon = {
            "model": data.get("model"),
            "added_tokens": [(t["id"], t["content"]) for t in data.get("added_tokens", [])],
            "pre_tokenizer": data.get("pre_tokenizer"),
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:16]

    # ---- encode / decode -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Encode text; the special-token strings in it become their single ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (special tokens: their UTF-8 text)."""
        return self.decode([token_id]).encode("utf-8", errors="surrogatepass")

    @property
    def backend(self):
        return self._tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on an iterator of documents."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise JojoError(
            f"vocab size {vocab_size} is too small; byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]

    def counted(it: Iterable[str]) -> Iterator[str]:
        for text in it:
            seen[0] += 1
            yield text

    tok.train_from_iterator(counted(texts), trainer=trainer)
    if seen[0] == 0:
        raise JojoError("cannot train a tokenizer on an empty corpus; give a file with some text")
    return Tokenizer(tok)
