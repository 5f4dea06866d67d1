import pytest

from jojo.errors import JojoError
from jojo.tokenizer import EOT, IM_END, IM_START, Tokenizer, parse_chatml, render_chat, train_tokenizer

UNICODE_SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF",
    "naïve café — “quotes” ‘single’ … ½ ∑ ∞",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🦙🚀👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽",
    "combining: e\u0301 a\u0308 Z\u0335\u0321\u0322",
    "zero width\u200bjoiner\u200d rtl: مرحبا بالعالم שלום",
    "numbers 1234567890 3.14159 -42 1e-9",
    "\x00\x01 control \x7f chars and a lone \ud7ff",
    "",
]


def test_round_trip_any_unicode(tokenizer):
    for text in UNICODE_SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids(tokenizer):
    for special in (EOT, IM_START, IM_END):
        ids = tokenizer.encode(f"a{special}b")
        sid = tokenizer.backend.token_to_id(special)
        assert sid in ids and ids.count(sid) == 1
        assert tokenizer.decode([sid]) == special
    chat = render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    ids = tokenizer.encode(chat)
    assert ids.count(tokenizer.im_start_id) == 2 and ids.count(tokenizer.im_end_id) == 2
    # merges never swallow a special token into a longer one
    assert all(tokenizer.decode([i]) in (IM_START, IM_END) or "<|" not in tokenizer.decode([i]) for i in ids)


def test_save_load_hash(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path)
    assert path.name == "tokenizer.json"
    again = Tokenizer.load(tmp_path)
    assert again.hash == tokenizer.hash
    assert again.encode("Once upon a time") == tokenizer.encode("Once upon a time")
    other = train_tokenizer(["completely different text " * 20, "more words here"] * 10, 300)
    assert other.hash != tokenizer.hash


def test_vocab_size_respected():
    tok = train_tokenizer(["the cat sat on the mat"] * 50 + ["a dog ran in the park"] * 50, 300)
    assert tok.vocab_size <= 300


def test_errors(tmp_path):
    with pytest.raises(JojoError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(JojoError, match="cannot read tokenizer"):
        Tokenizer.load(bad)
    with pytest.raises(JojoError, match="empty corpus"):
        train_tokenizer([], 512)


def test_chat_template_round_trip():
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?\nThanks"}]
    text = render_chat(msgs, add_generation_prompt=True)
    assert text.endswith(f"{IM_START}assistant\n")
    assert parse_chatml(render_chat(msgs)) == msgs
