import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import config_tree
from jojo.checkpoint import load_checkpoint, resolve_checkpoint
from jojo.config import load_config
from jojo.errors import JojoError
from jojo.quickstart import unigram_entropy_nats
from jojo.train.run import run_training


def tiny_cfg(prepared, out, family="gpt2", **sections):
    return load_config(None, config_tree(prepared, out, {"model": {"family": family}}, **sections))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_falls_well_below_unigram_entropy(prepared, tmp_path, family):
    cfg = tiny_cfg(prepared, tmp_path / "run", family, schedule={"max_steps": 120}, logging={"eval_interval": 120})
    result = run_training(cfg)
    unigram = unigram_entropy_nats(prepared)
    assert result.val_loss < 0.6 * unigram, (result.val_loss, unigram)
    assert result.val_bpb > prepared_floor(prepared)


def prepared_floor(prepared: Path) -> float:
    return json.loads((prepared / "meta.json").read_text())["splits"]["val"]["entropy_floor_bpb"]


def test_checkpoints_metrics_and_plot(prepared, tmp_path):
    run = tmp_path / "run"
    run_training(tiny_cfg(prepared, run))
    assert os.readlink(run / "latest") == "step-000030"
    assert (run / "best").is_symlink()
    ckpt = resolve_checkpoint(run)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "state.json", "optimizer.pt"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 30 and state["tokenizer_hash"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in rows} >= {"train", "eval", "end"}
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, tok, _ = load_checkpoint(run)
    assert model.config.vocab_size >= tok.vocab_size
    # keep_last=2 plus best: older numbered checkpoints are pruned
    assert len(list(run.glob("step-*"))) <= 3


def test_resume_is_bit_identical_to_uninterrupted(prepared, tmp_path):
    full = tmp_path / "full"
    run_training(tiny_cfg(prepared, full, logging={"keep_last": 10}), quiet=True)
    # A run "interrupted" at step 10: its directory holds only the step-10 checkpoint.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "step-000010", cut / "step-000010")
    os.symlink("step-000010", cut / "latest")
    res = run_training(tiny_cfg(prepared, cut), resume=True, quiet=True)
    assert res.step == 30
    a = load_file(str(full / "step-000030" / "model.safetensors"))
    b = load_file(str(resolve_checkpoint(cut) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_requires_a_run_and_fresh_refuses_overwrite(prepared, tmp_path):
    with pytest.raises(JojoError, match="nothing to resume"):
        run_training(tiny_cfg(prepared, tmp_path / "none"), resume=True)
    run = tmp_path / "run"
    run_training(tiny_cfg(prepared, run, schedule={"max_steps": 10}))
    with pytest.raises(JojoError, match="--resume"):
        run_training(tiny_cfg(prepared, run))
    res = run_training(tiny_cfg(prepared, run, schedule={"max_steps": 20}), resume=True)
    assert res.step == 20  # continued from the saved step


def test_init_from_loads_weights_only(prepared, tmp_path):
    base = tmp_path / "base"
    run_training(tiny_cfg(prepared, base, schedule={"max_steps": 10}))
    res = run_training(tiny_cfg(prepared, tmp_path / "ft", schedule={"max_steps": 5}), init_from=str(base))
    assert res.step == 5


def test_kill_during_checkpoint_write_keeps_latest_loadable(prepared, tmp_path):
    """Start a run in a subprocess, SIGKILL it repeatedly at random moments around saves; `latest` must load."""
    run = tmp_path / "run"
    cfg = tiny_cfg(prepared, run, schedule={"max_steps": 100000}, logging={"eval_interval": 1, "eval_iters": 1})
    cfg_path = tmp_path / "cfg.json"
    cfg.save(cfg_path)
    code = (
        "import sys; from jojo.config import load_config; from jojo.train.run import run_training;"
        f"run_training(load_config({str(cfg_path)!r}), resume={{}})"
    )
    kills = 0
    for attempt in range(4):
        resume = (run / "latest").exists()
        proc = subprocess.Popen(
            [sys.executable, "-c", code.replace("{}", str(resume))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.time() + 60
        while not (run / "latest").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3 + 0.37 * attempt)  # land somewhere inside the save-every-step cycle
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        model, tok, state = load_checkpoint(run)  # never half-written
        assert state["step"] >= 1
    assert kills == 4


def test_budget_and_config_errors(prepared, tmp_path):
    with pytest.raises(JojoError, match="no training budget"):
        run_training(tiny_cfg(prepared, tmp_path / "r", schedule={"max_steps": 0}))
    with pytest.raises(JojoError, match="unknown config key 'optimizer.lrr'.*did you mean 'lr'"):
        load_config(None, ["--optimizer.lrr=1"])
    with pytest.raises(JojoError, match="invalid value 'sgd' for 'optimizer.name'; allowed values: adamw, muon"):
        load_config(None, ["--optimizer", "sgd"])
    with pytest.raises(JojoError, match="expected int"):
        load_config(None, ["--max-iters", "ten"])
    cfg = load_config("tiny", ["--max-iters", "7", "--learning-rate=0.01", "--data.batch_size", "3"])
    assert (cfg.schedule.max_steps, cfg.optimizer.lr, cfg.data.batch_size) == (7, 0.01, 3)
    assert math.isclose(load_config("gpt2-124m").optimizer.lr, 6e-4)
