"""The Python API (jojo.api): LM, pretrain, finetune, and that the commands are thin callers of it."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import jojo
from conftest import config_tree, tiny_model_config
from jojo import cli
from jojo.checkpoint import resolve_checkpoint, write_checkpoint
from jojo.config import overrides_from_kwargs
from jojo.errors import JojoError
from jojo.infer.engine import SamplingConfig, StopMatcher
from jojo.model import GPT


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("api-run")
    write_checkpoint(run, 0, GPT(tiny_model_config("llama", block_size=64)), tokenizer, {})
    return run


def test_lazy_exports_and_import_is_light():
    import subprocess
    import sys

    code = "import sys, jojo; assert 'torch' not in sys.modules; print(jojo.LM.__name__, jojo.JojoError.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["LM", "JojoError"]


def test_generate_list_equals_single_calls(random_run):
    lm = jojo.LM.load(random_run, device="cpu")
    prompts = ["Once upon a time", "The dog", "What colour is the sky?"]
    singles = [lm.generate(p, max_tokens=16, temperature=0) for p in prompts]
    assert lm.generate(prompts, max_tokens=16, temperature=0) == singles
    assert all(isinstance(s, str) for s in singles)
    assert "".join(lm.stream(prompts[0], max_tokens=16, temperature=0)) == singles[0]
    # sampling with a seed is reproducible, and the same for one prompt alone or in a list
    a = lm.generate(prompts[1], max_tokens=16, temperature=1.0, top_k=20, seed=3)
    assert lm.generate([prompts[1]], max_tokens=16, temperature=1.0, top_k=20, seed=3) == [a]
    assert lm.config.block_size == 64 and lm.tokenizer is lm.generator.tokenizer


def test_stop_strings_cut_the_text(random_run):
    lm = jojo.LM.load(random_run, device="cpu")
    full = lm.generate("The cat", max_tokens=24, temperature=0)
    stop = full[5:8]
    assert stop and lm.generate("The cat", max_tokens=24, temperature=0, stop=[stop]) == full[: full.index(stop)]


def test_stop_matcher_holds_back_a_partial_match():
    m = StopMatcher(["<END>", "xyz"])
    out = [m.push(p) for p in ["ab", "c<E", "N", "D>tail"]]
    assert out == ["ab", "c", "", ""] and m.done and m.flush() == ""
    m = StopMatcher(["<END>"])
    assert m.push("a<EN") == "a" and m.flush() == "<EN"  # the stream ended: what was held back is text after all


def test_chat_and_score(random_run):
    lm = jojo.LM.load(random_run, device="cpu")
    messages = [{"role": "user", "content": "Hi"}]
    reply = lm.chat(messages, max_tokens=12, temperature=0)
    assert "".join(lm.chat(messages, stream=True, max_tokens=12, temperature=0)) == reply
    text = "Once upon a time there was a cat."
    s = lm.score(text)
    ids = [lm.tokenizer.eot_id] + lm.tokenizer.encode(text)
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([ids[:-1]]))
    nats = -torch.log_softmax(logits[0], -1).gather(1, torch.tensor(ids[1:])[:, None]).sum()
    assert s.tokens == len(ids) - 1
    assert math.isclose(s.bits, float(nats) / math.log(2), rel_tol=1e-5)
    assert math.isclose(s.bits_per_byte, s.bits / len(text.encode()), rel_tol=1e-9)
    with pytest.raises(JojoError, match="non-empty"):
        lm.score("")


def test_overrides_from_kwargs():
    tree = overrides_from_kwargs({"max_iters": 5, "optimizer": {"lr": 1e-3}, "model__n_layer": 3, "lora_rank": 2})
    assert tree == {
        "schedule": {"max_steps": 5},
        "optimizer": {"lr": 1e-3},
        "model": {"n_layer": 3},
        "lora": {"rank": 2},
    }
    with pytest.raises(JojoError, match="did you mean 'max_iters'"):
        overrides_from_kwargs({"max_iter": 5})


def test_pretrain_from_python_equals_jojo_train(prepared, tmp_path, capsys):
    """The same settings through jojo.pretrain and `jojo train` give the same final loss, bit for bit."""
    tree = config_tree(prepared, tmp_path / "unused", schedule={"max_steps": 12}, logging={"eval_interval": 6})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tree))
    py = jojo.pretrain(str(cfg_file), out=tmp_path / "py", quiet=True)
    assert cli.main(["train", "--config", str(cfg_file), "--out", str(tmp_path / "cli")]) == 0
    assert f"val loss {py.val_loss:.4f}" in capsys.readouterr().out
    a = load_file(str(resolve_checkpoint(tmp_path / "py") / "model.safetensors"))
    b = load_file(str(resolve_checkpoint(tmp_path / "cli") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows if r["event"] == "eval"][-1] == py.val_loss
    assert py.checkpoint == resolve_checkpoint(tmp_path / "py") and py.step == 12


def test_sft_resume_from_the_command_line_needs_no_other_flag(prepared, tmp_path, tokenizer):
    """`jojo sft CKPT --data chats.jsonl --format alpaca --out R`, cut at step 3, then `jojo sft --resume --out R`
    continues bit-identically to the uninterrupted run (the data options come from the run's own config)."""
    base = tmp_path / "base"
    jojo.pretrain(config_tree(prepared, base, schedule={"max_steps": 4}), quiet=True)
    data = tmp_path / "chats.jsonl"
    rows = [{"instruction": f"Say {w} {i}", "output": f"{w}!"} for i in range(30) for w in ("hi", "yes")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full, cut = tmp_path / "full", tmp_path / "cut"
    flags = ["--max-iters", "6", "--batch-size", "4", "--eval-interval", "3", "--logging.keep_last", "10",
             "--logging.progress", "false", "--device", "cpu", "--val-fraction", "0.1"]  # fmt: skip
    assert cli.main(["sft", str(base), "--data", str(data), "--format", "alpaca", "--out", str(full), *flags]) == 0
    cut.mkdir()
    shutil.copytree(full / "step-000003", cut / "step-000003")
    os.symlink("step-000003", cut / "latest")
    assert cli.main(["sft", "--resume", "--out", str(cut)]) == 0
    a = load_file(str(full / "step-000006" / "model.safetensors"))
    b = load_file(str(resolve_checkpoint(cut) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((resolve_checkpoint(cut) / "state.json").read_text())
    assert state["run_config"]["data"]["format"] == "alpaca" and state["run_config"]["data"]["val_fraction"] == 0.1


def test_help_lists_every_config_field(capsys):
    import dataclasses
    import typing

    from jojo.config import TrainConfig

    sections = typing.get_type_hints(TrainConfig)

    for command in ("train", "sft"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        for section in dataclasses.fields(TrainConfig):
            for f in dataclasses.fields(sections[section.name]):
                assert f"--{section.name}.{f.name}" in text, (command, section.name, f.name)
        for flat in ("--optimizer", "--grad-accum", "--block-size", "--packing", "--lora-rank", "--format"):
            assert flat in text


def test_sampling_config_is_checked():
    with pytest.raises(JojoError, match="top-p"):
        SamplingConfig(top_p=0)


def test_generate_prompt_file_batch_interactive_and_nonstop(random_run, tmp_path, capsys, monkeypatch):
    lm = jojo.LM.load(random_run, device="cpu")
    prompts = ["Once upon a time", "The dog", "What colour"]
    (tmp_path / "p.txt").write_text("Once upon a time\nThe dog\n\nWhat colour\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    singles = [lm.generate(p, max_tokens=12, temperature=0) for p in prompts]
    for name in ("p.txt", "p.jsonl"):
        out = tmp_path / f"{name}.results.jsonl"
        args = ["generate", str(random_run), "--prompt-file", str(tmp_path / name), "--output", str(out),
                "--max-tokens", "12", "--temperature", "0", "--device", "cpu"]  # fmt: skip
        assert cli.main(args) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == prompts and [r["completion"] for r in rows] == singles
        assert all(r["finish_reason"] in ("stop", "length") and r["tokens"] <= 12 for r in rows)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    assert cli.main(["generate", str(random_run), "--prompt-file", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    # --nonstop decodes past the context (64 tokens here) by sliding the window
    gen = jojo.LM.load(random_run, device="cpu").generator
    gen.text_stops = set()  # no stop id: only the budget ends it
    ids = gen.prompt_ids("The cat")
    sc = SamplingConfig(max_tokens=150, temperature=0)
    plain = list(gen.stream_ids(ids, sc))
    longer = list(gen.stream_ids(ids, sc, nonstop=True))
    assert len(plain) == 64 - len(ids) and len(longer) == 150 and longer[: len(plain)] == plain
    # --interactive: each line typed is continued
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\n/quit\n"))
    assert cli.main(["generate", str(random_run), "--interactive", "--max-tokens", "12", "--temperature", "0"]) == 0
    assert singles[0] in capsys.readouterr().out
