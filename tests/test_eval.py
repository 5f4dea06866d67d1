"""jojo.eval: the likelihood engine and its scoring rules, LM metrics (bpb from raw bytes, equality with the
training loop's val bpb), chat exact match, generation metrics, data download, the CLI and the lm-eval plug-in."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from conftest import config_tree, tiny_model_config
from jojo.cli import main
from jojo.config import load_config
from jojo.errors import JojoError
from jojo.eval import download as dl
from jojo.eval import tasks as zs
from jojo.eval.chat import answer, chat_exact_match
from jojo.eval.gen import distinct_n, generation_quality, generation_speed, repetition_rate
from jojo.eval.lm import TokenWindows, evaluate_split, evaluate_text, token_byte_lengths
from jojo.eval.run import evaluate_checkpoint
from jojo.model import GPT, IGNORE_INDEX
from jojo.tokenizer import train_tokenizer
from jojo.train.run import run_training

# ---- a fake model with fixed log-probabilities ----------------------------------------------------------


class FakeCache:
    def __init__(self, batch: int, max_len: int):
        self.k = torch.zeros(1, batch, 1, max_len, 1)
        self.v = torch.zeros(1, batch, 1, max_len, 1)
        self.pos = 0


def _log_table(probs: dict[int, float], vocab: int) -> torch.Tensor:
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    p = torch.full((vocab,), rest)
    for t, q in probs.items():
        p[t] = q
    return p.log()  # already normalised: its log_softmax is itself


class FixedModel(torch.nn.Module):
    """The next token is drawn from `probs` (token id -> p; the rest share what is left), whatever the context;
    with `after=(token, probs2)`, from probs2 when the previous token is `token`."""

    def __init__(self, probs: dict[int, float], vocab: int, block_size: int = 64, after=None):
        super().__init__()
        self.logp = torch.nn.Parameter(_log_table(probs, vocab), requires_grad=False)
        self.after_token = after[0] if after else -1
        self.after = _log_table(after[1], vocab) if after else self.logp.data
        self.config = tiny_model_config("gpt2", vocab_size=vocab, block_size=block_size)

    def new_cache(self, batch, max_len=None, dtype=None):
        return FakeCache(batch, max_len or self.config.block_size)

    def forward(self, idx, targets=None, *, cache=None, last_only=False, doc_ids=None):
        if cache is not None:
            assert cache.pos + idx.shape[1] <= cache.k.shape[3]
            cache.pos += idx.shape[1]
        if last_only:
            idx = idx[:, -1:]
        prev = (idx == self.after_token)[..., None]
        return torch.where(prev, self.after, self.logp.data), None


@pytest.fixture(scope="module")
def char_tok():
    """Byte-level BPE with no merges: every ASCII character is one token."""
    return train_tokenizer(["abc xyz"], 259)


def test_hand_computed_scores(char_tok):
    tid = lambda ch: char_tok.encode(ch)[0]  # noqa: E731
    x, y, space = tid("x"), tid("y"), tid(" ")
    model = FixedModel({x: 0.4, y: 0.1, space: 0.2}, char_tok.vocab_size)
    a, b, s = math.log(0.4), math.log(0.1), math.log(0.2)
    items = [
        {"query": "q", "choices": ["x", "xx"], "gold": 1},  # sum: 0; per char: 1; per token: 1
        {"query": "q", "choices": ["x", "xxy"], "gold": 1},  # sum: 0; per char: 1; per token: 0
        {"query": "q", "choices": ["y", "x"], "gold": 1},  # every rule: 1
    ]
    # By hand: each continuation is " " + choice, one token per character.
    # item 2: ll(" x") = s + a = -2.526, ll(" xxy") = s + 2a + b = -5.745
    #   per character (without the space): -2.526 / 1 < -5.745 / 3 = -1.915 -> "xxy";
    #   per token: -2.526 / 2 = -1.263 > -5.745 / 4 = -1.436 -> "x"
    out = zs.run_task(model, char_tok, "hellaswag", items=items, return_items=True)
    rows = out["items"]
    assert rows[0]["logprobs"] == pytest.approx([s + a, s + 2 * a], abs=1e-5)
    assert rows[1]["logprobs"] == pytest.approx([s + a, s + 2 * a + b], abs=1e-5)
    assert rows[2]["logprobs"] == pytest.approx([s + b, s + a], abs=1e-5)
    assert [r["tokens"] for r in rows] == [[2, 3], [2, 4], [2, 2]]
    assert [r["pred"] for r in rows] == [0, 0, 1]
    assert [r["pred_norm"] for r in rows] == [1, 1, 1]
    assert [r["pred_norm_token"] for r in rows] == [1, 0, 1]
    assert out["acc"] == pytest.approx(1 / 3)
    assert out["acc_norm"] == pytest.approx(1.0)
    assert out["acc_norm_token"] == pytest.approx(2 / 3)
    assert out["n"] == 3 and out["truncated"] == 0
    # stderr of the mean of (0, 0, 1): sample sd sqrt(1/3) over sqrt(3) = 1/3
    assert out["acc_stderr"] == pytest.approx(1 / 3)


def test_schema_and_lambada_rules(char_tok):
    tid = lambda ch: char_tok.encode(ch)[0]  # noqa: E731
    x, space = tid("x"), tid(" ")
    # a space is the likeliest next token, except after a space, where "x" is
    model = FixedModel({space: 0.5, x: 0.3}, char_tok.vocab_size, after=(space, {x: 0.6}))
    lam = [{"context": "abc", "continuation": "x"}, {"context": "abc", "continuation": "xy"}]
    out = zs.run_task(model, char_tok, "lambada", items=lam, return_items=True)
    # " x": the space, then "x" after it, both the argmax -> exact match; " xy": "y" is not the argmax
    assert [r["greedy"] for r in out["items"]] == [True, False]
    assert out["acc"] == 0.5
    p_y = 0.2 / (char_tok.vocab_size - 2)
    ll = [math.log(0.5) + math.log(0.6), math.log(0.5) + math.log(0.6) + math.log(p_y)]
    assert [r["logprobs"][0] for r in out["items"]] == pytest.approx(ll, abs=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(-sum(ll) / 2), rel=1e-5)
    wino = [{"context_options": ["a b", "c d e"], "continuation": "xx", "gold": 0}]
    out = zs.run_task(model, char_tok, "winogrande", items=wino, return_items=True)
    # the same continuation after each option: equal scores, the tie goes to the first
    assert out["items"][0]["logprobs"][0] == pytest.approx(out["items"][0]["logprobs"][1])
    assert out["acc"] == 1.0 and "acc_norm" not in out


# ---- tokenization at the boundary ---------------------------------------------------------------------


def test_boundary_whitespace_moves_into_the_continuation(tokenizer):
    ctx, cont = zs.encode_pair(tokenizer, "The cat ", "sat down")
    assert ctx == tokenizer.encode("The cat")
    whole = tokenizer.encode("The cat sat down")
    assert ctx + cont == whole
    assert tokenizer.decode(cont) == " sat down"
    # a continuation follows the query after one space
    model = FixedModel({}, tokenizer.vocab_size)
    spec = zs.TASKS["hellaswag"]
    requests, counts = zs._requests(spec, [{"query": "Lily went", "choices": ["home.", "out."], "gold": 0}], tokenizer,
                                    chat=False)  # fmt: skip
    assert counts == [2]
    assert [tokenizer.decode(c) for _, c in requests] == [" home.", " out."]
    assert all(tokenizer.decode(c) == "Lily went" for c, _ in requests)
    # an empty context conditions on <|endoftext|>
    ctx, cont = zs.encode_pair(tokenizer, "", "hello")
    assert ctx == [tokenizer.eot_id] and cont == tokenizer.encode("hello")
    assert model is not None


# ---- the engine against a plain forward ----------------------------------------------------------------


def _naive(model, ctx, cont):
    T = model.config.block_size
    full = (ctx + cont)[-(T + 1) :]
    with torch.no_grad():
        logits, _ = model(torch.tensor([full[:-1]]))
    logp = torch.log_softmax(logits[0].float(), -1)[-len(cont) :]
    tgt = torch.tensor(cont)
    return float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_engine_matches_a_plain_forward_and_counts_truncation(family):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(family, vocab_size=96, block_size=24)).eval()
    rng = random.Random(1)
    requests = []
    for _ in range(20):
        ctx = [rng.randrange(96) for _ in range(rng.randint(1, 40))]
        for _ in range(rng.randint(1, 4)):
            requests.append((ctx, [rng.randrange(96) for _ in range(rng.randint(1, 10))]))
    # a continuation that is the model's own greedy choice: `greedy` must say so
    ctx = [5, 6, 7]
    cont = []
    for _ in range(4):
        with torch.no_grad():
            cont.append(int(model(torch.tensor([ctx + cont]))[0][0, -1].argmax()))
    requests.append((ctx, cont))
    scores = zs.score_requests(model, requests, batch_size=5)
    for (c, k), s in zip(requests, scores):
        ll, greedy = _naive(model, c, k)
        assert s.logprob == pytest.approx(ll, abs=1e-4)
        assert s.greedy == greedy
        assert s.truncated == max(len(c) + len(k) - 25, 0)
        assert s.tokens == len(k)
    assert scores[-1].greedy
    assert sum(s.truncated > 0 for s in scores) > 0


def test_task_counts_truncated_items(char_tok):
    torch.manual_seed(0)
    model = GPT(tiny_model_config("gpt2", vocab_size=char_tok.vocab_size, block_size=16)).eval()
    items = [{"query": "a" * 30, "choices": ["b", "c"], "gold": 0}, {"query": "ab", "choices": ["b", "c"], "gold": 1}]
    out = zs.run_task(model, char_tok, "piqa", items=items, return_items=True)
    assert out["truncated"] == 2  # both choices of the first item lost their oldest context tokens
    assert [r["truncated"] for r in out["items"]] == [2, 0]
    # the truncated request scores as the left-cut row does
    ctx, cont = zs.encode_pair(char_tok, "a" * 30, " b")
    assert out["items"][0]["logprobs"][0] == pytest.approx(_naive(model, ctx, cont)[0], abs=1e-4)


# ---- LM metrics ----------------------------------------------------------------------------------------


def test_bpb_counts_raw_bytes_of_a_token_holding_half_a_character(tmp_path):
    tok = train_tokenizer(["café au lait"] * 3, 259)  # no merges: "é" is two tokens, one byte each
    lengths = token_byte_lengths(tok)
    first, second = tok.encode("é")
    assert lengths[first] == 1 and lengths[second] == 1
    # decoding half a character gives U+FFFD, 3 bytes in UTF-8: the trap this avoids
    assert len(tok.decode([first]).encode("utf-8")) == 3
    assert lengths[tok.eot_id] == 0 and lengths[tok.im_start_id] == len("<|im_start|>")
    text = "café au lait\n\nthé vert"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    torch.manual_seed(0)
    model = GPT(tiny_model_config("gpt2", vocab_size=tok.vocab_size, block_size=8)).eval()
    out = evaluate_text(model, tok, tmp_path / "t.txt", batch_size=2)
    assert out["documents"] == 2
    assert out["bytes_scored"] == out["text_bytes"] == len(text.replace("\n\n", "").encode("utf-8"))
    assert out["tokens"] == out["text_tokens"] - 1  # every token but the first (<|endoftext|>) is predicted
    nats = out["loss"] * out["tokens"]
    assert out["bpb"] == pytest.approx(nats / math.log(2) / out["bytes_scored"])
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))


def test_sliding_windows_score_every_token_once():
    stream = list(range(1, 30))
    for stride in (1, 3, 8):
        win = TokenWindows([stream], block_size=8, batch_size=4, stride=stride)
        seen = []
        for batch in win.iter_sequential():
            for x, y in zip(batch["input_ids"], batch["targets"]):
                for pos, t in enumerate(y.tolist()):
                    if t != IGNORE_INDEX:
                        assert x[pos] + 1 == t  # the target follows its input token in the stream
                        seen.append(t)
        assert sorted(seen) == stream[1:]
    with pytest.raises(JojoError, match="stride"):
        TokenWindows([stream], block_size=8, batch_size=4, stride=9)


@pytest.fixture(scope="module")
def tiny_run(prepared, tmp_path_factory):
    """A tiny gpt2 trained for a few steps on the shared prepared shards: (run dir, FitResult)."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = load_config(None, config_tree(prepared, out, schedule={"max_steps": 12}, logging={"eval_interval": 12}))
    return out, run_training(cfg)


def test_val_bpb_equals_the_training_loops(tiny_run, prepared):
    run, result = tiny_run
    report = evaluate_checkpoint(run, tasks="lm")  # the run's own dataset, batch size and eval_iters
    assert report["lm"]["source"].startswith(str(prepared))
    assert report["lm"]["bpb"] == result.val_bpb
    assert report["lm"]["loss"] == result.val_loss
    # more batches than the run's validation, through the flags the CLI passes
    more = evaluate_checkpoint(run, tasks="lm", data=prepared, max_batches=6, batch_size=8)["lm"]
    assert more["tokens"] == 6 * 8 * 64 > report["lm"]["tokens"]
    assert 0 < more["accuracy"] < 1
    from jojo.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(run)
    slid = evaluate_split(model, tok, prepared, "val", stride=32, max_batches=2)
    assert slid["stride"] == 32 and slid["tokens"] == 64 + 15 * 32  # 16 windows: the first scores 64, the others 32


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_input_one_line_errors(tmp_path, char_tok):
    with pytest.raises(JojoError, match=r"not found.*jojo eval download --tasks hellaswag"):
        zs.load_items("hellaswag", tmp_path / "missing")
    with pytest.raises(JojoError, match=r"no data for task 'piqa'.*jojo eval download --tasks piqa"):
        zs.load_items("piqa", tmp_path)
    with pytest.raises(JojoError, match=r"unknown task 'helaswag'; did you mean 'hellaswag'"):
        zs.task_spec("helaswag")
    bad = tmp_path / "piqa.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a", "b"]\n')
    with pytest.raises(JojoError, match=rf"{bad}:2: not valid JSON"):
        zs.load_items("piqa", tmp_path)
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(JojoError, match=rf"{bad}:1: 'gold' must be an integer index below 2"):
        zs.load_items("piqa", tmp_path)


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["eval", str(run), "--tasks", "helaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'hellaswag'" in err
    assert main(["eval", str(run), "--tasks", "piqa", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "jojo eval download --tasks piqa" in err


# ---- the CLI end to end --------------------------------------------------------------------------------

SAMPLE = {
    "hellaswag_val_head.jsonl": [
        {"query": "Cooking: She cracks an egg into the bowl. she", "choices": ["whisks it.", "drives off.",
                                                                             "sings loudly.", "reads a map."],
         "gold": 0},
        {"query": "Running: A man ties his shoes. he", "choices": ["starts to run.", "eats soup.", "sleeps.",
                                                                   "paints a wall."], "gold": 0},
    ],
    "winogrande.jsonl": [{"context_options": ["Tom gave Ann a gift because Tom", "Tom gave Ann a gift because Ann"],
                          "continuation": "was generous.", "gold": 0}] * 3,
    "lambada_openai.jsonl": [{"context": "Once upon a time there was a little", "continuation": "girl"}] * 3,
}  # fmt: skip


def _write_sample(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in SAMPLE.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_cli_end_to_end(tiny_run, tmp_path, capsys):
    run, result = tiny_run
    data = _write_sample(tmp_path / "evaldata")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"question": "What colour is the sky?", "answer": "blue", "kind": "colour"}) + "\n")
    out = tmp_path / "results.json"
    argv = ["eval", str(run), "--data-dir", str(data), "--limit", "2", "--output", str(out), "--chat-data", str(chats)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "hellaswag" in text and "acc_norm_token" in text and "chat exact match" in text
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"hellaswag", "winogrande", "lambada"}  # every task whose data is present
    assert [report["tasks"][t]["n"] for t in ("hellaswag", "winogrande", "lambada")] == [2, 2, 2]
    assert report["lm"]["bpb"] == pytest.approx(result.val_bpb, rel=1e-12)
    assert report["chat"]["n"] == 1
    # --chat scores the multiple-choice tasks through the chat template (LAMBADA has no chat form)
    assert main(["eval", str(run), "--data-dir", str(data), "--limit", "2", "--chat", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"hellaswag", "winogrande"}
    assert all(t["mode"] == "chat" and "acc_norm" not in t for t in report["tasks"].values())


def test_shared_data_slice(tiny_run, shared_data):
    from jojo.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_run[0])
    res = zs.run_tasks(model, tok, "hellaswag,arc_challenge", data_dir=shared_data / "eval", limit=4)
    assert list(res) == ["hellaswag", "arc-challenge"]
    assert all(r["n"] == 4 and 0 <= r["acc"] <= 1 for r in res.values())
    assert zs.available_tasks(shared_data / "eval") == list(zs.TASKS)
    flat = zs.flat_metrics(res)
    assert "hellaswag/acc_norm" in flat and "arc-challenge/acc_norm_token" in flat


# ---- chat ----------------------------------------------------------------------------------------------


def test_chat_exact_match_and_chat_multiple_choice(tiny_run, tmp_path):
    from jojo.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_run[0])
    own = answer(model, tok, [{"role": "user", "content": "What is 2 plus 3?"}], max_tokens=12)
    f = tmp_path / "c.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": own}],
         "kind": "add"},
        {"question": "What is 2 plus 3?", "answer": own + " no", "kind": "add"},
    ]  # fmt: skip
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = chat_exact_match(model, tok, f, max_tokens=12)
    assert res["exact_match"] == 0.5 and res["correct"] == 1 and res["by_kind"] == {"add": 0.5}
    f.write_text(json.dumps(rows[0]) + "\n{broken\n")
    with pytest.raises(JojoError, match=rf"{f}:2: not valid JSON"):
        chat_exact_match(model, tok, f)
    # --chat: the score of an option is its letter's log-probability after the chat prompt
    item = {"query": "Which is a colour?", "choices": ["red", "dog", "run"], "gold": 0}
    out = zs.run_task(model, tok, "arc-easy", items=[item], chat=True, return_items=True)
    question, n = zs.chat_question(zs.TASKS["arc-easy"], item)
    assert n == 3 and "A. red\nB. dog\nC. run" in question
    from jojo.tokenizer import encode_chat

    prompt, _ = encode_chat(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
    expect = [_naive(model, prompt, tok.encode(letter))[0] for letter in "ABC"]
    assert out["items"][0]["logprobs"] == pytest.approx(expect, abs=1e-4)


# ---- generation ----------------------------------------------------------------------------------------


def test_generation_metrics(tiny_run):
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert repetition_rate(["a b c d a b c d"]) == pytest.approx(1 / 5)
    assert repetition_rate(["a b c d e"]) == 0
    from jojo.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_run[0])
    q = generation_quality(model, tok, prompts=["Once upon a time", "Hi"], max_tokens=10, seed=3)
    assert len(q["samples"]) == 2 and 0 <= q["distinct_2"] <= 1
    assert q == generation_quality(model, tok, prompts=["Once upon a time", "Hi"], max_tokens=10, seed=3)
    s = generation_speed(model, new_tokens=8, repeats=1)
    assert s["prefill_tokens_per_second"] > 0 and s["decode_tokens_per_second"] > 0 and s["peak_memory_mb"] > 0


# ---- download ------------------------------------------------------------------------------------------

OFFICIAL = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.",
     "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "label": 3, "split": "val"},
    {"ind": 9, "activity_label": "Health", "ctx": "[header] How to relax [title] Breathe deeply. [step] Sit down.",
     "endings": ["[substeps] Close  your eyes.", "Eat a [title] cake.", "Run.", "Shout."], "label": "0"},
]  # fmt: skip


def test_download_converts_and_writes_a_manifest(tmp_path, shared_data):
    src = tmp_path / "hellaswag_val.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in OFFICIAL))
    out = tmp_path / "eval"
    manifest = dl.download_tasks(["hellaswag"], out, urls={"hellaswag": src.as_uri()}, say=lambda _: None)
    rows = [json.loads(line) for line in (out / "hellaswag.jsonl").read_text().splitlines()]
    # the first official record becomes exactly the first item of the shared slice
    shared_first = json.loads((shared_data / "eval" / "hellaswag_val_head.jsonl").read_text().splitlines()[0])
    assert rows[0] == shared_first
    assert rows[1] == {
        "query": "Health: How to relax. Breathe deeply. Sit down.",
        "choices": [" Close your eyes.", "Eat a. cake.", "Run.", "Shout."],  # harness's order: strip, then clean
        "gold": 0,
    }
    entry = manifest["tasks"]["hellaswag"]
    assert entry["rows"] == 2 and entry["file"] == "hellaswag.jsonl"
    import hashlib

    assert entry["sha256"] == hashlib.sha256((out / "hellaswag.jsonl").read_bytes()).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # a llm-foundry file is checked and kept; the manifest gains the task
    piqa = tmp_path / "piqa_src.jsonl"
    shutil.copy(shared_data / "eval" / "piqa.jsonl", piqa)
    manifest = dl.download_tasks("piqa", out, urls={"piqa": piqa.as_uri()}, say=lambda _: None)
    assert set(manifest["tasks"]) == {"hellaswag", "piqa"} and manifest["tasks"]["piqa"]["rows"] == 1838
    assert zs.available_tasks(out) == ["hellaswag", "piqa"]


def test_download_offline_fails_fast_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(dl.SOURCES, "piqa", "http://127.0.0.1:9/piqa.jsonl")  # nothing listens on port 9
    with pytest.raises(JojoError, match=r"cannot download http://127.0.0.1:9/piqa.jsonl .*no network"):
        dl.download_tasks(["piqa"], tmp_path / "x", timeout=5, say=lambda _: None)
    assert main(["eval", "download", "--tasks", "piqa", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jojo: error: cannot download") and "\n" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q"}\n')
    with pytest.raises(JojoError, match=rf"{bad.as_uri()}:1: 'choices' must be a list"):
        dl.download_tasks(["arc-easy"], tmp_path / "x", urls={"arc-easy": bad.as_uri()}, say=lambda _: None)


# ---- lm-evaluation-harness plug-in ---------------------------------------------------------------------


def test_lm_eval_plugin(tiny_run):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import jojo.eval.harness  # noqa: F401  (registers the model)

    lm = get_model("jojo").create_from_arg_string(f"path={tiny_run[0]},device=cpu", {"batch_size": "4"})
    assert lm.batch_size == 4 and lm.max_length == 64
    pairs = [("Lily saw a ", "dog."), ("Lily saw a", " cat."), ("", "Hello")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    mine = zs.score_requests(lm.model, zs.encode_pairs(lm.tok, pairs))
    assert [g[0] for g in got] == pytest.approx([s.logprob for s in mine], abs=1e-5)
    text = "Once upon a time there was a girl. " * 20  # longer than the context: several windows
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = lm.tok.encode(text)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.tok.eot_id, 64, 1)]
    assert len(windows) > 1 and sum(len(c) for _, c in windows) == len(ids)  # every token scored once
    total = sum(_naive(lm.model, c, k)[0] for c, k in windows)
    assert rolling[0] == pytest.approx(total, rel=1e-4)
    gen = lm.generate_until([Instance("generate_until", {}, ("Once upon a", {"until": ["."], "max_gen_toks": 12}), 0)])
    assert isinstance(gen[0], str) and "." not in gen[0]
