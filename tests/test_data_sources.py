"""Sources: every file format, compression, folders and globs, streaming splits, renderings, recipes, hub."""

from __future__ import annotations

import gzip
import json
import socket
import time

import pytest

from jojo import cli
from jojo.data import sources
from jojo.data.recipes import RECIPES, list_recipes, open_source, recipe_source
from jojo.data.sources import FileSource, TextFormat, check_hub, iter_texts, split_text
from jojo.errors import JojoError
from jojo.tokenizer import EOT, IM_END, IM_START, parse_chatml

DOCS = ["First doc.\nSecond line.", "Ünïcödé 🦙 日本語", 'quote " and {braces} [1, 2]', "last one"]


def texts(source: FileSource) -> list[str]:
    return [r["text"] for r in source.records()]


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of a few characters, so that every separator, JSON value and line straddles a block edge."""
    monkeypatch.setattr(sources, "BLOCK_CHARS", 7)


# ---- plain text --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, joiner",
    [("blank", "\n\n"), ("blank", "\n  \n\t\n"), ("eot", f"\n{EOT}\n"), ("line", "\n"), ("@@@", "@@@")],
)
def test_text_split_modes(tmp_path, tiny_blocks, mode, joiner):
    docs = [d.replace("\n", " ") for d in DOCS] if mode == "line" else [d for d in DOCS]
    if mode == "blank":
        docs = [d.replace("\n", " ") if "\n" in d else d for d in docs]
    path = tmp_path / "corpus.txt"
    path.write_text(joiner.join(docs) + "\n", encoding="utf-8")
    assert texts(FileSource(path, split_on=mode)) == docs


def test_streamed_blank_split_equals_whole_file_split(tmp_path, monkeypatch):
    # Whitespace runs of every shape, cut at every offset, must split as the whole text would.
    text = "a\n\nb\n \n\nc \n d\n\n\n\n e\n\t\n\nf\n \ng\n\n"
    path = tmp_path / "t.txt"
    path.write_text(text)
    expected = split_text(text, "blank")
    for block in range(1, 12):
        monkeypatch.setattr(sources, "BLOCK_CHARS", block)
        assert texts(FileSource(path, split_on="blank")) == expected, block


def test_auto_split_and_file_mode(tmp_path):
    (tmp_path / "eot.txt").write_text(f"one\n\nstill one{EOT}two")
    (tmp_path / "blank.txt").write_text("one\n\ntwo")
    assert texts(FileSource(tmp_path / "eot.txt")) == ["one\n\nstill one", "two"]
    assert texts(FileSource(tmp_path / "blank.txt")) == ["one", "two"]
    assert texts(FileSource(tmp_path / "blank.txt", split_on="file")) == ["one\n\ntwo"]


def test_folder_and_glob_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("sea")
    (tmp_path / ".hidden").write_text("never")
    assert texts(FileSource(tmp_path, split_on="file")) == ["ay", "bee", "sea"]
    assert texts(FileSource(str(tmp_path / "*.txt"), split_on="file")) == ["ay", "bee"]
    assert texts(FileSource(str(tmp_path / "**" / "*.md"), split_on="file")) == ["sea"]
    with pytest.raises(JojoError, match="no files match"):
        FileSource(str(tmp_path / "*.nothing"))
    with pytest.raises(JojoError, match="not found"):
        FileSource(tmp_path / "missing.txt")


def test_not_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(JojoError, match="not UTF-8"):
        texts(FileSource(tmp_path / "latin1.txt"))


# ---- JSON, JSONL, Parquet, CSV -----------------------------------------------------------------------
def test_jsonl_with_field_and_bits(tmp_path, tiny_blocks):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"body": d, "bits": 10.5 * i}) for i, d in enumerate(DOCS)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]))  # a blank line is skipped
    recs = list(FileSource(path, text=TextFormat("field", "body")).records())
    assert [r["text"] for r in recs] == DOCS
    assert [r["bits"] for r in recs] == [0.0, 10.5, 21.0, 31.5]


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(JojoError, match=r"bad.jsonl:2: not valid JSON"):
        texts(FileSource(path))
    path.write_text('{"body": "x"}\n')
    with pytest.raises(JojoError, match=r"no string field 'text' \(fields: body\)"):
        texts(FileSource(path))


def test_json_array_streamed(tmp_path, tiny_blocks):
    items = [{"text": d, "n": 12345} for d in DOCS] + ["a bare string", {"text": "   "}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False))
    assert texts(FileSource(path)) == [*DOCS, "a bare string"]
    path.write_text("[]")
    assert texts(FileSource(path)) == []
    path.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(JojoError, match="not valid JSON"):
        texts(FileSource(path))
    path.write_text('{"text": "jsonl saved as .json"}\n{"text": "second"}\n')
    assert texts(FileSource(path)) == ["jsonl saved as .json", "second"]


def test_template_over_fields(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Add 2+2", "output": "4", "input": None}) + "\n")
    fmt = TextFormat("template", template="{instruction}\n{input}{output}")
    assert texts(FileSource(path, text=fmt)) == ["Add 2+2\n4"]
    with pytest.raises(JojoError, match="needs field 'answer'"):
        texts(FileSource(path, text=TextFormat("template", template="{answer}")))
    with pytest.raises(JojoError, match="bad --template"):
        TextFormat("template", template="{a.b}")


def test_parquet_reads_only_needed_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": DOCS, "url": [f"u{i}" for i in range(len(DOCS))], "score": [1.0] * len(DOCS)})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=2)
    src = FileSource(path)
    assert texts(src) == DOCS
    assert sum(b.nbytes for b in src.blocks()) == path.stat().st_size
    tmpl = TextFormat("template", template="{url}: {text}")
    assert texts(FileSource(path, text=tmpl))[0] == "u0: " + DOCS[0]
    with pytest.raises(JojoError, match="no column 'content'"):
        texts(FileSource(path, text=TextFormat("field", "content")))


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text('word,definition\ncat,"a small animal, furry"\ndog,a loyal animal\n')
    assert texts(FileSource(tmp_path / "d.csv", text=TextFormat("definition"))) == [
        "cat: a small animal, furry",
        "dog: a loyal animal",
    ]
    (tmp_path / "d.tsv").write_text("text\tother\nhello there\tx\n")
    assert texts(FileSource(tmp_path / "d.tsv")) == ["hello there"]


# ---- compression -------------------------------------------------------------------------------------
def test_gzip_and_zstd(tmp_path, tiny_blocks):
    zstandard = pytest.importorskip("zstandard")
    jsonl = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS).encode()
    plain = f"\n{EOT}\n".join(DOCS).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(plain))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    for name in ("a.jsonl.gz", "b.txt.gz", "c.jsonl.zst", "d.txt.zst"):
        src = FileSource(tmp_path / name)
        assert texts(src) == DOCS, name
        # progress counts the bytes as stored (compressed), so the ETA matches the file sizes
        assert sum(b.nbytes for b in src.blocks()) == (tmp_path / name).stat().st_size, name
    assert texts(FileSource(str(tmp_path / "*.jsonl.*"))) == DOCS + DOCS


# ---- renderings and recipes --------------------------------------------------------------------------
def test_chat_renderings():
    conv = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello!"}]}
    text = TextFormat("chatml").render(conv, "x")
    assert parse_chatml(text) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]
    alpaca = {"instruction": "Translate", "input": "chat", "output": "cat"}
    msgs = parse_chatml(TextFormat("alpaca").render(alpaca, "x"))
    assert msgs == [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]
    squad = {"question": "Capital of France?", "answers": {"text": ["Paris"], "answer_start": [0]}, "context": "..."}
    assert parse_chatml(TextFormat("qa").render(squad, "x"))[1] == {"role": "assistant", "content": "Paris"}
    assert TextFormat("qa").render({"question": "?", "answers": {"text": []}}, "x") == ""
    dialog = parse_chatml(TextFormat("dialog").render({"dialog": ["Hi.", "Hey.", "Bye."]}, "x"))
    assert [m["role"] for m in dialog] == ["user", "assistant", "user"]
    assert TextFormat("definition").render({"Word": "cat", "Definition": "an animal"}, "x") == "cat: an animal"
    with pytest.raises(JojoError, match="no conversation"):
        TextFormat("chatml").render({"text": "x"}, "x")


def test_recipes_listed_and_local_source(tmp_path):
    names = {"story", "fineweb-edu", "dolma", "c4", "openwebtext", "chat", "chitchat", "knowledge", "dictionary",
             "dailydialog", "alpaca", "sft"}  # fmt: skip
    assert names <= set(RECIPES)
    listing = list_recipes()
    assert all(name in listing for name in names) and "roneneldan/TinyStories" in listing
    sft = tmp_path / "chats.jsonl"
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]  # fmt: skip
    sft.write_text(json.dumps({"conversations": conv}) + "\n")
    (doc,) = texts(recipe_source("sft", local=str(sft)))
    assert doc.startswith(f"{IM_START}system\nBe brief.{IM_END}\n") and parse_chatml(doc) == conv
    with pytest.raises(JojoError, match="pass --source PATH"):
        recipe_source("sft")
    with pytest.raises(JojoError, match="did you mean 'alpaca'"):
        recipe_source("alpacca")


def test_alpaca_recipe_on_shared_data(shared_data):
    docs = texts(open_source(str(shared_data / "alpaca" / "alpaca_small.json"), dataset="alpaca"))
    assert len(docs) == 2000
    assert all(len(parse_chatml(d)) == 2 for d in docs)


def test_tinystories_excerpt(shared_data):
    docs = list(iter_texts(shared_data / "tinystories" / "tinystories_train_head.txt"))
    assert len(docs) > 1000 and all(d.strip() for d in docs)
    v2 = list(iter_texts(shared_data / "tinystories" / "tinystories_v2_sample.txt"))
    assert 3 <= len(v2) < 10 and all(EOT not in d for d in v2)  # split on <|endoftext|> automatically


# ---- the hub, offline --------------------------------------------------------------------------------
def _hub_reachable() -> bool:
    try:
        check_hub("roneneldan/TinyStories", timeout=3)
        return True
    except JojoError:
        return False


def test_hub_offline_fails_fast_with_the_way_out(capsys):
    if _hub_reachable():
        pytest.skip("the Hugging Face hub is reachable here")
    started = time.perf_counter()
    code = cli.main(["prepare", "--hf", "roneneldan/TinyStories", "--out", "unused-never-created"])
    assert time.perf_counter() - started < 15
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot reach the Hugging Face hub" in err and "--source PATH" in err
    started = time.perf_counter()
    assert cli.main(["prepare", "--dataset", "fineweb-edu", "--out", "unused-never-created"]) == 2
    assert time.perf_counter() - started < 15
    assert "--source PATH" in capsys.readouterr().err


def test_hub_probe_is_bounded_when_the_hub_hangs(monkeypatch):
    # A server that accepts the connection and never answers: the probe must give up on its own.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        started = time.perf_counter()
        with pytest.raises(JojoError, match="cannot reach the Hugging Face hub"):
            check_hub("any/dataset", timeout=1)
        assert time.perf_counter() - started < 4
    finally:
        server.close()


def test_hub_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(JojoError, match="--source PATH"):
        list(open_source(hf="roneneldan/TinyStories").blocks())


def test_dolma_falls_back_to_c4_when_missing(monkeypatch, capsys):
    from jojo.data import recipes
    from jojo.data.sources import Block, DatasetMissing, HubSource

    def fake_check(self):
        if self.name == "allenai/dolma":
            raise DatasetMissing("dataset 'allenai/dolma' does not exist")

    def fake_blocks(self):
        self.check()
        yield Block("docs", [(f"a page from {self.name}", None)])

    monkeypatch.setattr(HubSource, "check", fake_check)
    monkeypatch.setattr(HubSource, "blocks", fake_blocks)
    src = recipes.recipe_source("dolma")
    assert texts(src) == ["a page from allenai/c4"]
    assert "using 'c4' instead" in capsys.readouterr().out
    assert src.fingerprint()["fallback"]["subset"] == "en"
