"""Prepare: token counts and document boundaries, splits, shards, cache, tokenizer safety, the fast encoder."""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest

from jojo import cli
from jojo.data.loader import BatchLoader
from jojo.data.prepare import DocEncoder, load_meta, prepare_corpus, prepare_records, prepare_source
from jojo.data.sources import FileSource, RecordSource
from jojo.data.synthetic import iter_corpus_text
from jojo.errors import JojoError
from jojo.tokenizer import EOT, IM_END, IM_START, Tokenizer, evaluate_tokenizer, train_tokenizer

VARIED = [
    "Hello, world! It's a test; we'll see what they've done. I'm sure you'd agree.",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF   \n\n\n   ",
    "naïve café — “quotes” ‘single’ … ½ ∑ ∞ ≠ ≤ Ω",
    "日本語のテキスト、中文文本，한국어 텍스트 ไทย हिन्दी",
    "emoji 🦙🚀👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽👍🏿",
    "combining: e\u0301 a\u0308 Z\u0335\u0321\u0322 n\u0303o\u0302",
    "zero width\u200bjoiner\u200d rtl: مرحبا بالعالم שלום",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F 1,000,000 ٣٤٥ ⅷ",
    "\x00\x01 control \x7f chars \u00ad soft hyphen \u00a0nbsp",
    "code: def f(x):\n    return x**2  # comment\n\n\n\tif a != b: pass",
    f"special strings {EOT} inside {IM_START}user\nhi{IM_END}\n and broken <|endoftext <|im_start| |>",
    "         many spaces          then\n\n\n\n\nnewlines",
]


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x391, 0x3C9), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F),
              (0x1F900, 0x1F9FF), (0x2000, 0x206F)]  # fmt: skip
    out = []
    for _ in range(n):
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", " \n ", "123", "4.5"]))
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def unicode_tok():
    rng = random.Random(0)
    corpus = VARIED * 30 + [_random_unicode(rng, 400) for _ in range(300)] + list(iter_corpus_text(300, seed=3))
    return train_tokenizer(corpus, 1500)


# ---- the fast encoder --------------------------------------------------------------------------------
def test_tiktoken_path_equals_tokenizers_on_varied_unicode(unicode_tok):
    enc, reason = unicode_tok.tiktoken_encoding()
    assert enc is not None, reason
    rng = random.Random(1)
    samples = VARIED + [_random_unicode(rng, rng.randint(1, 300)) for _ in range(400)]
    samples += ["", " ", "\n", EOT, EOT + EOT, f"{IM_START}assistant\n", "a" * 5000, " 1 22 333 4444 55555"]
    for text in samples:
        assert enc.encode(text, allowed_special="all") == unicode_tok.encode(text), repr(text)
    # the block encoder: one tiktoken call over EOT-joined documents == per-document ids with EOT before each
    got = DocEncoder(unicode_tok).encode_docs(samples)
    want = [i for text in samples for i in [unicode_tok.eot_id, *unicode_tok.encode(text)]]
    assert got.tolist() == want


def test_unconvertible_tokenizer_falls_back(unicode_tok):
    data = json.loads(unicode_tok.to_json())
    data["pre_tokenizer"]["add_prefix_space"] = True
    from tokenizers import Tokenizer as HF

    odd = Tokenizer(HF.from_str(json.dumps(data)))
    enc, reason = odd.tiktoken_encoding()
    assert enc is None and "prefix space" in reason
    encoder = DocEncoder(odd)
    assert encoder.kind == "tokenizers"
    assert encoder.encode_docs(["hello there"]).tolist() == [odd.eot_id, *odd.encode("hello there")]


# ---- token counts and document boundaries ------------------------------------------------------------
def _read_split(out, meta, split) -> np.ndarray:
    dtype = np.dtype(meta["dtype"])
    parts = [np.fromfile(out / s["file"], dtype=dtype) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _docs_of(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    cuts = np.flatnonzero(tokens == tok.eot_id).tolist() + [len(tokens)]
    return [tok.decode(tokens[a + 1 : b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_round_trip_counts_and_boundaries(tmp_path, tokenizer, workers):
    docs = list(dict.fromkeys([*iter_corpus_text(400, seed=11), *VARIED[:4]]))  # unique, to check the order
    src = tmp_path / "c.jsonl.gz"
    import gzip

    src.write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    out = tmp_path / "out"
    meta = prepare_source(FileSource(src), tokenizer, out, val_fraction=0.2, test_fraction=0.1, workers=workers)
    total_tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)
    assert sum(info["tokens"] for info in meta["splits"].values()) == total_tokens
    assert sum(info["docs"] for info in meta["splits"].values()) == len(docs)
    assert sum(info["bytes"] for info in meta["splits"].values()) == sum(len(d.encode()) for d in docs)
    seen = []
    for split in ("train", "val", "test"):
        tokens = _read_split(out, meta, split)
        assert len(tokens) == meta["splits"][split]["tokens"]
        assert tokens[:1].tolist() == [tokenizer.eot_id]  # every document starts with <|endoftext|>
        split_docs = _docs_of(tokens, tokenizer)
        assert len(split_docs) == meta["splits"][split]["docs"]
        seen += split_docs
        # each split keeps the input order
        order = [docs.index(d) for d in split_docs]
        assert order == sorted(order)
    assert sorted(seen) == sorted(docs)
    assert meta["splits"]["test"]["docs"] > 0 and meta["build"]["encoder"] == "tiktoken"


def test_same_output_whatever_the_workers_and_blocks(tmp_path, tokenizer, monkeypatch):
    text = "\n\n".join(iter_corpus_text(3000, seed=5))
    (tmp_path / "c.txt").write_text(text)
    a = prepare_source(FileSource(tmp_path / "c.txt"), tokenizer, tmp_path / "a", workers=1)
    from jojo.data import sources

    monkeypatch.setattr(sources, "BLOCK_CHARS", 4096)  # many small blocks over 2 processes
    b = prepare_source(FileSource(tmp_path / "c.txt"), tokenizer, tmp_path / "b", workers=2)
    assert b["build"]["workers"] == 2
    for split in ("train", "val"):
        assert a["splits"][split]["tokens"] == b["splits"][split]["tokens"]
        assert np.array_equal(_read_split(tmp_path / "a", a, split), _read_split(tmp_path / "b", b, split))


def test_split_by_document_hash_with_seed(tmp_path, tokenizer):
    docs = [{"text": f"document number {i} " * 3} for i in range(2000)] + [{"text": "dup"}] * 50
    m0 = prepare_records(docs, tokenizer, tmp_path / "s0", val_fraction=0.1, test_fraction=0.1, seed=0)
    again = prepare_records(docs[::-1], tokenizer, tmp_path / "s0b", val_fraction=0.1, test_fraction=0.1, seed=0)
    m1 = prepare_records(docs, tokenizer, tmp_path / "s1", val_fraction=0.1, test_fraction=0.1, seed=1)
    for split in ("train", "val", "test"):
        assert m0["splits"][split]["docs"] == again["splits"][split]["docs"]  # order does not matter
    assert 100 < m0["splits"]["val"]["docs"] < 330 and 100 < m0["splits"]["test"]["docs"] < 330
    assert m0["splits"]["val"]["tokens"] != m1["splits"]["val"]["tokens"]  # the seed does
    dup_splits = [
        s for s in ("train", "val", "test") if "dup" in _docs_of(_read_split(tmp_path / "s0", m0, s), tokenizer)
    ]
    assert len(dup_splits) == 1  # identical documents never straddle splits


def test_bits_flow_to_entropy_floor(tmp_path, tokenizer):
    recs = [{"text": f"story {i} about a cat", "bits": 10.0 + i % 3} for i in range(300)]
    meta = prepare_records(recs, tokenizer, tmp_path / "o", val_fraction=0.2)
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["entropy_floor_bpb"] == pytest.approx(info["bits"] / info["bytes"])
    assert "entropy_floor_bpb" not in meta["splits"]["test"]  # empty split: no floor
    meta = prepare_records([{"text": r["text"]} for r in recs], tokenizer, tmp_path / "p", val_fraction=0.2)
    assert "entropy_floor_bpb" not in meta["splits"]["train"]


def test_bounded_shards_and_empty_test_split(tmp_path, tokenizer):
    docs = [{"text": t} for t in iter_corpus_text(800, seed=2)]
    meta = prepare_records(docs, tokenizer, tmp_path / "o", val_fraction=0.1)
    assert meta["splits"]["test"] == {"docs": 0, "tokens": 0, "bytes": 0, "shards": []}
    small = prepare_source(RecordSource(docs), tokenizer, tmp_path / "s", shard_tokens=5000, workers=1)
    shards = small["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] <= 5000 for s in shards)
    assert sum(s["tokens"] for s in shards) == small["splits"]["train"]["tokens"]
    assert load_meta(tmp_path / "s")["splits"]["test"]["docs"] == 0
    BatchLoader(tmp_path / "s", "train", batch_size=2, block_size=32).next_batch()
    with pytest.raises(JojoError, match="fewer than one batch"):
        BatchLoader(tmp_path / "s", "test", batch_size=2, block_size=32)


def test_too_small_or_empty_corpus(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(JojoError, match="corpus is empty"):
        prepare_source(FileSource(tmp_path / "empty.txt"), tokenizer, tmp_path / "o")
    with pytest.raises(JojoError, match="val-fraction"):
        prepare_source(
            FileSource(tmp_path / "empty.txt"), tokenizer, tmp_path / "o", val_fraction=0.6, test_fraction=0.5
        )


# ---- cache and tokenizer safety ----------------------------------------------------------------------
def test_cache_hit_is_instant(tmp_path, tokenizer, capsys):
    path = tmp_path / "big.txt"
    with path.open("w") as fh:
        size = 0
        for text in iter_corpus_text(10**9, seed=4):
            fh.write(text + f"\n{EOT}\n")
            size += len(text)
            if size > 6e6:
                break
    out = tmp_path / "o"
    started = time.perf_counter()
    meta, hit = prepare_corpus(FileSource(path), out, tokenizer=tokenizer, workers=1)
    first = time.perf_counter() - started
    assert not hit and meta["cache_key"]
    started = time.perf_counter()
    again, hit = prepare_corpus(FileSource(path), out, tokenizer=tokenizer, workers=1)
    second = time.perf_counter() - started
    assert hit and again == meta and "cache hit" in capsys.readouterr().out
    assert second < 0.05 * first, (first, second)
    # any change to the input, the options or the tokenizer misses
    _, hit = prepare_corpus(FileSource(path), out, tokenizer=tokenizer, workers=1, test_fraction=0.1)
    assert not hit
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    _, hit = prepare_corpus(FileSource(path), out, tokenizer=tokenizer, workers=1, test_fraction=0.1)
    assert not hit


def test_refuses_to_mix_tokenizers(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text("\n\n".join(iter_corpus_text(300, seed=1)))
    other = train_tokenizer(list(iter_corpus_text(200, seed=9)), 300)
    prepare_source(FileSource(tmp_path / "c.txt"), tokenizer, tmp_path / "o")
    with pytest.raises(JojoError) as err:
        prepare_source(FileSource(tmp_path / "c.txt"), other, tmp_path / "o")
    msg = str(err.value)
    assert tokenizer.hash in msg and other.hash in msg and "--overwrite" in msg
    assert load_meta(tmp_path / "o")["tokenizer_hash"] == tokenizer.hash  # untouched
    meta = prepare_source(FileSource(tmp_path / "c.txt"), other, tmp_path / "o", overwrite=True)
    assert meta["tokenizer_hash"] == other.hash
    assert Tokenizer.load(tmp_path / "o").hash == other.hash


def test_interrupted_run_leaves_no_meta(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text("\n\n".join(iter_corpus_text(300, seed=1)))
    prepare_source(FileSource(tmp_path / "c.txt"), tokenizer, tmp_path / "o")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(JojoError, match="not valid JSON"):
        prepare_source(FileSource(tmp_path / "bad.jsonl"), tokenizer, tmp_path / "o")
    assert not (tmp_path / "o" / "meta.json").exists()
    assert not list((tmp_path / "o").glob("*.bin*"))


# ---- the command line --------------------------------------------------------------------------------
def test_cli_prepare_template_and_eval(tmp_path, capsys, monkeypatch):
    rows = [{"instruction": f"Say {w}", "output": f"{w}!"} for w in ("hi", "yes", "no", "ok") for _ in range(40)]
    rows = [dict(r, instruction=f"{r['instruction']} #{i}") for i, r in enumerate(rows)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    args = ["prepare", "--source", str(tmp_path / "a.jsonl"), "--template", "{instruction}\\n{output}",
            "--out", str(out), "--vocab-size", "300", "--test-fraction", "0.1"]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "trained a tokenizer" in printed and "test:" in printed
    tok = Tokenizer.load(out)
    meta = load_meta(out)
    train_docs = _docs_of(_read_split(out, meta, "train"), tok)
    assert all("\n" in d and d.endswith("!") for d in train_docs)
    assert cli.main(args) == 0 and "cache hit" in capsys.readouterr().out
    assert cli.main(["prepare", "--list"]) == 0 and "fineweb-edu" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # without --out, the shards go to data/<source name>
    no_out = [a for a in args if a not in ("--out", str(out))]
    assert cli.main(no_out) == 0 and "prepared -> data/a" in capsys.readouterr().out
    assert load_meta(tmp_path / "data" / "a")["splits"]["train"]["docs"] == meta["splits"]["train"]["docs"]

    other = train_tokenizer([r["instruction"] for r in rows] * 3, 280).save(tmp_path / "other.json")
    code = cli.main(["tokenizer", "eval", "--tokenizer", str(out), "--compare", str(other), "--input",
                     str(tmp_path / "a.jsonl"), "--field", "output"])  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "bytes / token" in table and "specials never split" in table and "NO" not in table


def test_evaluate_tokenizer_reports_specials(unicode_tok):
    texts = VARIED + [f"{IM_START}user\nhi{IM_END}\n{EOT}"]
    report = evaluate_tokenizer(unicode_tok, texts)
    assert report["specials_never_split"]
    assert report["specials"][IM_START]["in_corpus"] == report["specials"][IM_START]["encoded_as_one_id"] == 2
    assert report["bytes"] == sum(len(t.encode()) for t in texts)
    assert report["bytes_per_token"] == pytest.approx(report["bytes"] / report["tokens"])


def test_recipe_prepare_on_shared_alpaca(tmp_path, shared_data, tokenizer):
    from jojo.data.recipes import open_source

    src = open_source(str(shared_data / "alpaca" / "alpaca_small.json"), dataset="alpaca")
    meta, _ = prepare_corpus(src, tmp_path / "o", tokenizer=tokenizer)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 2000
