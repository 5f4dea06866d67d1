"""Bad input gets one line on stderr naming the problem, exit status 2, and no traceback."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model_config
from jojo.checkpoint import write_checkpoint
from jojo.model import GPT


def jojo(*args, cwd=None, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "jojo.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_model_config("gpt2", vocab_size=512))
    run = tmp_path_factory.mktemp("run")
    write_checkpoint(run, 1, model, tokenizer, {"run_config": {}})
    return run


def test_missing_corpus(tmp_path):
    assert_one_line_error(jojo("prepare", "--source", tmp_path / "nope.txt", "--out", tmp_path / "d"), "not found")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    proc = jojo("prepare", "--source", tmp_path / "empty.txt", "--out", tmp_path / "d")
    assert_one_line_error(proc, "empty")


def test_checkpoint_without_tokenizer(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt / "latest", broken)
    (broken / "tokenizer.json").unlink()
    assert_one_line_error(jojo("generate", broken, "--prompt", "hi"), "tokenizer.json")


def test_checkpoint_from_another_tokenizer(ckpt, tmp_path):
    from jojo.tokenizer import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(ckpt / "latest", other)
    train_tokenizer(["some unrelated words here and there"] * 50, 300).save(other)
    assert_one_line_error(jojo("generate", other, "--prompt", "hi"), "tokenizer")


def test_unknown_config_key(tmp_path):
    proc = jojo("train", "--dataset", tmp_path, "--optimizer.lrr=0.1")
    assert_one_line_error(proc, "optimizer.lrr", "lr")
    assert_one_line_error(jojo("train", "--max-itres", "3"), "--max-itres", "--max-iters")
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"model": {"n_layers": 2}}')
    assert_one_line_error(jojo("train", "--config", cfg), "model.n_layers", "n_layer")


def test_prompt_longer_than_context(ckpt):
    proc = jojo("generate", ckpt, "--prompt", "word " * 200)
    assert_one_line_error(proc, "context")


def test_generate_streams_and_writes_output(ckpt, tmp_path):
    out = tmp_path / "samples.txt"
    proc = jojo(
        "generate", ckpt, "--prompt", "Once", "--max-tokens", "8", "--seed", "1", "--num-samples", "2", "--output", out
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- sample") == 2
    assert out.read_text().count("Once") >= 2
