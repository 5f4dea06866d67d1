"""Time budgets, plain log lines, small validation splits, presets and the quickstart folder (issue 14's items)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import jojo
from conftest import config_tree
from jojo import cli
from jojo.config import ScheduleConfig, load_config
from jojo.errors import JojoError
from jojo.train.schedule import lr_multiplier


def test_schedule_by_time_progress():
    cfg = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(4, 10**12, cfg, progress=0.0) == pytest.approx(0.5)  # warm-up still in steps
    assert lr_multiplier(50, 10**12, cfg, progress=0.0) == pytest.approx(1.0)
    assert lr_multiplier(50, 10**12, cfg, progress=0.5) == pytest.approx(0.55)
    assert lr_multiplier(50, 10**12, cfg, progress=1.0) == pytest.approx(0.1)
    assert lr_multiplier(50, 10**12, cfg, progress=3.0) == pytest.approx(0.1)
    wsd = ScheduleConfig(warmup_steps=0, decay="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(5, 0, wsd, progress=0.7) == 1.0 and lr_multiplier(5, 0, wsd, progress=0.9) == pytest.approx(
        0.5
    )


def test_time_budget_parses_durations():
    assert load_config(None, ["--time-budget", "5m"]).schedule.max_seconds == 300
    assert load_config(None, ["--time-budget=1.5h"]).schedule.max_seconds == 5400
    assert load_config(None, ["--time-budget", "42"]).schedule.max_seconds == 42
    with pytest.raises(JojoError, match="duration like 90s"):
        load_config(None, ["--time-budget", "soon"])


@pytest.fixture
def step_clock(monkeypatch):
    """The training loop's clock advances one second per optimizer step: a 10 s budget is 10 steps whatever
    this machine's speed."""
    from types import SimpleNamespace

    from jojo.train import loop as loop_mod

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(loop_mod, "time", SimpleNamespace(time=lambda: clock.now))
    real_step = loop_mod.optimizer_step

    def step_and_tick(run):
        real_step(run)
        clock.now += 1.0

    monkeypatch.setattr(loop_mod, "optimizer_step", step_and_tick)
    return clock


def test_time_budget_ends_the_run_at_the_deadline(prepared, tmp_path, step_clock):
    """A fake clock that advances one second per optimizer step: a 10 s budget is 10 steps whatever this
    machine's speed, and the cosine reaches its floor at the deadline."""
    tree = config_tree(prepared, tmp_path / "run", schedule={"max_steps": 0, "max_seconds": 10, "warmup_steps": 2},
                       logging={"eval_interval": 10_000, "log_interval": 1})  # fmt: skip
    result = jojo.pretrain(tree, quiet=True)
    assert result.step == 10 and result.val_loss is not None
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["event"] == "train"]
    peak = load_config(None, tree).optimizer.lr
    assert lrs[1] == pytest.approx(peak)  # warm-up over 2 steps, then ...
    assert lrs[2] == pytest.approx(peak)  # ... the decay starts from the peak where warm-up ended on the clock ...
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] < 0.15 * peak  # ... and is at the floor by 10 s
    state = json.loads((tmp_path / "run" / "latest" / "state.json").read_text())
    assert state["elapsed"] >= 10 and state["warmup_elapsed"] == pytest.approx(2.0)
    with pytest.raises(JojoError, match="time budget"):  # resuming an exhausted budget says what to raise
        jojo.pretrain(tree, resume=True, quiet=True)


def test_time_budget_ends_a_long_warm_up_at_half_the_budget(prepared, tmp_path, step_clock):
    """100 warm-up steps do not fit a 10 s budget at one step a second: warm-up ends at 5 s, then the decay from
    the peak reaches the floor by the deadline."""
    tree = config_tree(prepared, tmp_path / "run", schedule={"max_steps": 0, "max_seconds": 10, "warmup_steps": 100},
                       logging={"eval_interval": 10_000, "log_interval": 1})  # fmt: skip
    jojo.pretrain(tree, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["event"] == "train"]
    peak = load_config(None, tree).optimizer.lr
    assert lrs[:5] == pytest.approx([peak * (s + 1) / 100 for s in range(5)])  # the ramp, cut short at 5 s ...
    assert lrs[5] == pytest.approx(peak) and lrs[-1] < 0.2 * peak  # ... then from the peak down to the floor


def test_plain_progress_lines_when_stderr_is_not_a_terminal(prepared, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(config_tree(prepared, tmp_path / "run", schedule={"max_steps": 10},
                                               logging={"progress": True, "log_interval": 5})))  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "jojo.cli", "train", "--config", str(cfg_file)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("step ")]
    assert [x.split(":")[0] for x in lines] == ["step 5/10", "step 10/10"] and "\r" not in proc.stderr


def test_validation_split_smaller_than_a_batch_is_evaluated(prepared, tmp_path):
    # the val split holds fewer rows than a 64-row batch: evaluated with the rows there are
    from jojo.data.loader import BatchLoader

    val = BatchLoader(prepared, "val", batch_size=10_000, block_size=64, shuffle=False, evaluation=True)
    assert val.rows_per_epoch < 10_000 and sum(b["input_ids"].shape[0] for b in val.iter_sequential()) > 0
    result = jojo.pretrain(config_tree(prepared, tmp_path / "r", schedule={"max_steps": 2}), quiet=True,
                           data={"batch_size": 4}, logging={"eval_iters": 0})  # fmt: skip
    assert result.val_loss is not None


def test_list_presets(capsys):
    assert cli.main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "small", "llama-28m", "gpt-71m", "gpt2-124m"):
        assert name in out
    rows = {p["name"]: p for p in jojo.api.presets()}
    assert round(rows["gpt2-124m"]["params"] / 1e6) == 124 and round(rows["gpt-71m"]["params"] / 1e6) == 71
    assert round(rows["llama-28m"]["params"] / 1e6) == 28 and "sft-tiny" not in rows


def test_quickstart_folder_resolves_to_its_chat_model(tmp_path, tokenizer, capsys):
    import torch

    from conftest import tiny_model_config
    from jojo.checkpoint import resolve_checkpoint, write_checkpoint
    from jojo.model import GPT

    torch.manual_seed(0)
    qs = tmp_path / "quickstart"
    write_checkpoint(qs / "model", 5, GPT(tiny_model_config("gpt2")), tokenizer, {})
    assert resolve_checkpoint(qs).parent == (qs / "model").resolve()
    write_checkpoint(qs / "sft", 7, GPT(tiny_model_config("gpt2")), tokenizer, {})
    assert resolve_checkpoint(qs / "").name == "step-000007"
    assert "sft" in capsys.readouterr().err


def test_dry_run_of_a_preset_needs_no_dataset(capsys):
    """`jojo train --config gpt2-124m --dry-run`: the model, FLOPs and memory from the config alone."""
    assert cli.main(["train", "--config", "gpt2-124m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 124,475,904" in out and "FLOPs per token" in out and "memory per process" in out
    assert "no --dataset given" in out


def test_eval_tasks_during_training(prepared, tmp_path, shared_data):
    """--eval-tasks runs zero-shot tasks at each evaluation: metrics.jsonl, and the plot's second panel."""
    tree = config_tree(prepared, tmp_path / "run", schedule={"max_steps": 4},
                       logging={"eval_interval": 2, "eval_tasks": "hellaswag,piqa", "eval_limit": 8,
                                "eval_data_dir": str(shared_data / "eval")})  # fmt: skip
    jojo.pretrain(tree, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["event"] == "eval"]
    assert len(evals) == 2 and all(0 <= r["hellaswag/acc_norm"] <= 1 and "piqa/acc" in r for r in evals)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    with pytest.raises(JojoError, match="hellaswg|did you mean"):  # a typo fails before training
        jojo.pretrain(config_tree(prepared, tmp_path / "r2", logging={"eval_tasks": "hellaswg"}), quiet=True)
