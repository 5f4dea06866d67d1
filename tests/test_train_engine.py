"""The training engine: multi-process equivalence, optimizers, schedules, precision, monitoring, early stopping,
graceful SIGTERM, dry runs, batch-size search and config errors. Tiny models, CPU, seconds each."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import config_tree, tiny_model_config
from jojo.checkpoint import load_checkpoint, resolve_checkpoint
from jojo.cli import main as cli_main
from jojo.config import ScheduleConfig, load_config
from jojo.data.loader import BatchLoader
from jojo.device import pick_dtype
from jojo.errors import JojoError
from jojo.model import GPT
from jojo.train import loop as loop_mod
from jojo.train.optim import build_optimizer, orthogonalize
from jojo.train.run import run_training
from jojo.train.schedule import lr_multiplier
from jojo.train.system import fit_micro_batch, plan_batch

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


# smaller and shorter than conftest's base: these tests run many trainings, some as two processes
ENGINE_SIZES = {
    "model": {"block_size": 32, "n_head": 2, "n_embd": 32},
    "data": {"batch_size": 4},
    "schedule": {"max_steps": 6, "warmup_steps": 2},
    "system": {"seed": 3},
    "logging": {"eval_interval": 3, "eval_iters": 2, "log_interval": 1},
}


def cfg_tree(prepared, out, **sections) -> dict:
    return config_tree(prepared, out, ENGINE_SIZES, **sections)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def torchrun(tmp_path, tree: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    cfg_path = tmp_path / f"cfg-{nproc}.json"
    cfg_path.write_text(json.dumps(tree))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "jojo.cli", "train", "--config", str(cfg_path)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


# ---- scale out -------------------------------------------------------------------------------------------


def test_ranks_read_disjoint_rows_that_make_up_the_single_process_batch(prepared):
    one = BatchLoader(prepared, "train", batch_size=8, block_size=32, seed=1)
    ranks = [BatchLoader(prepared, "train", batch_size=4, block_size=32, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        full = one.next_batch()["input_ids"]
        parts = [r.next_batch()["input_ids"] for r in ranks]
        assert torch.equal(torch.cat(parts), full)
        assert not any(torch.equal(a, b) for a in parts[0] for b in parts[1])  # no row on both ranks


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_with_the_same_global_batch(prepared, tmp_path, fsdp):
    """torchrun with 2 gloo processes x 4 rows == 1 process x 8 rows: the same losses, step by step."""
    multi = cfg_tree(prepared, tmp_path / "multi", system={"device": "cpu", "seed": 3, "fsdp": fsdp})
    proc = torchrun(tmp_path, multi)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = cfg_tree(prepared, tmp_path / "single", data={"dataset": str(prepared), "batch_size": 8})
    run_training(load_config(None, single), quiet=True)
    a, b = train_losses(tmp_path / "multi"), train_losses(tmp_path / "single")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=1e-5), (a, b)
    assert a[-1] < a[0]
    # rank 0 alone wrote the run; its checkpoint loads without any process group
    model, _, state = load_checkpoint(tmp_path / "multi")
    assert state["step"] == 6 and model.num_params() > 0
    assert not list((tmp_path / "multi").glob("*rank*"))


# ---- optimizers and schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,compute", [("adamw", torch.float32), ("muon", torch.float32), ("muon", torch.bfloat16)])
def test_optimizer_drives_loss_down(name, compute):
    torch.manual_seed(0)
    model = GPT(tiny_model_config("llama", vocab_size=64, block_size=16))
    cfg = load_config(None, {"optimizer": {"name": name, "lr": 3e-3, "muon_lr": 0.02}}).optimizer
    opt = build_optimizer(model, cfg, compute_dtype=compute)
    if name == "muon":
        assert type(opt.optimizers[0]).__name__ == "Muon" and opt.optimizers[0].ns_dtype == compute
    x = torch.randint(0, 64, (4, 17))
    losses = []
    for _ in range(40):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 64), (48, 128), (160, 40)])
def test_muon_orthogonalisation_against_svd(shape, dtype):
    # bfloat16: what a run training in bf16 iterates in (Muon's own choice); the result is as orthogonal
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    exact = u @ vh
    approx = orthogonalize(g, dtype=dtype)
    sv = torch.linalg.svdvals(approx)
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())  # Newton-Schulz's known band ~[0.7, 1.2]
    cos = torch.nn.functional.cosine_similarity(approx.flatten(), exact.flatten(), dim=0)
    assert cos > 0.95, cos
    assert approx.dtype == g.dtype and approx.shape == g.shape


def test_schedule_shapes():
    n = 100
    cos = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    m = [lr_multiplier(s, n, cos) for s in range(n)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(m[:10], m[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(m[10:], m[11:]))  # then only decays
    assert m[-1] == pytest.approx(0.1)
    wsd = ScheduleConfig(warmup_steps=10, decay="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    w = [lr_multiplier(s, n, wsd) for s in range(n)]
    assert all(v == 1.0 for v in w[10:80])  # stable
    assert all(a > b for a, b in zip(w[80:], w[81:])) and w[-1] == pytest.approx(0.0)
    const = ScheduleConfig(warmup_steps=5, decay="constant")
    assert [lr_multiplier(s, n, const) for s in (0, 4, 50, 99)] == [0.2, 1.0, 1.0, 1.0]


# ---- precision -------------------------------------------------------------------------------------------


def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused(prepared, tmp_path):
    tree = cfg_tree(prepared, tmp_path / "bf16", system={"device": "cpu", "dtype": "bfloat16", "seed": 3})
    res = run_training(load_config(None, tree), quiet=True)
    losses = train_losses(tmp_path / "bf16")
    assert res.step == 6 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    with pytest.raises(JojoError, match="float16 autocast is not supported on CPU"):
        pick_dtype("float16", torch.device("cpu"))


# ---- monitoring ------------------------------------------------------------------------------------------


def test_sampling_during_training_leaves_the_training_model_as_it_was(tmp_path, tokenizer):
    from jojo.infer.decode import DecodeLinear
    from jojo.train.monitor import Monitor

    cfg = load_config(None, cfg_tree(tmp_path / "unused", tmp_path / "run", logging={"sample_tokens": 8}))
    monitor = Monitor(tmp_path / "run", cfg)
    model = GPT(tiny_model_config("llama", vocab_size=tokenizer.vocab_size))
    model.train()
    try:
        text = monitor.sample(3, model, tokenizer)
    finally:
        monitor.close()
    assert isinstance(text, str) and model.training
    # the sample decodes with the model as it is: no inference-only conversion, every weight still trainable
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_tensorboard_scalars_text_and_png(prepared, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    tree = cfg_tree(prepared, run, logging={**cfg_tree(prepared, run)["logging"], "tensorboard": True})
    run_training(load_config(None, tree), quiet=True)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_second", "eval/val_loss", "eval/val_bpb"} <= set(scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [3, 6]
    assert any("sample" in t for t in acc.Tags()["tensors"])  # add_text is stored as a text tensor
    with Image.open(run / "loss.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 100


def test_wandb_missing_is_a_one_line_error(prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, installed or not
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg_tree(prepared, tmp_path / "run")))
    assert cli_main(["train", "--config", str(cfg_path), "--wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install wandb" in err


# ---- checkpoints, early stopping, signals ----------------------------------------------------------------


def test_early_stopping_after_patience_evaluations(prepared, tmp_path, monkeypatch):
    val_losses = iter([3.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    monkeypatch.setattr(loop_mod, "evaluate_loss", lambda *a, **k: (next(val_losses), 1))
    run = tmp_path / "run"
    tree = cfg_tree(prepared, run, schedule={"max_steps": 30}, logging={**cfg_tree(prepared, run)["logging"]})
    tree["logging"]["patience"] = 2
    res = run_training(load_config(None, tree), quiet=True)
    assert res.stopped_early and not res.interrupted
    assert res.step == 12  # evals at 3 (3.0), 6 (2.5, best), 9 (2.6), 12 (2.7): two without a gain
    assert res.best_val_loss == 2.5
    assert os.readlink(run / "best") == "step-000006" and os.readlink(run / "latest") == "step-000012"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "end" and rows[-1]["stopped_early"] is True


def test_sigterm_saves_at_the_step_reached_and_resume_continues(prepared, tmp_path):
    run = tmp_path / "run"
    tree = cfg_tree(prepared, run, schedule={"max_steps": 100000, "warmup_steps": 2})
    tree["logging"]["eval_interval"] = 100000
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tree))
    cmd = [sys.executable, "-m", "jojo.cli", "train", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert time.time() - t0 < 30  # prompt: finishes the step, one eval + save, exits
    assert "interrupted and saved" in out
    state = json.loads((resolve_checkpoint(run) / "state.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    reached = rows[-1]["step"]
    assert rows[-1]["event"] == "end" and rows[-1]["interrupted"] and state["step"] == reached >= 3
    resumed = load_config(None, {**tree, "schedule": {"max_steps": reached + 2, "warmup_steps": 2}})
    res = run_training(resumed, resume=True, quiet=True)
    assert res.step == reached + 2


# ---- dry run, batch size, config -------------------------------------------------------------------------


def test_dry_run_prints_the_numbers_and_writes_nothing(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg_tree(prepared, run)))
    assert cli_main(["train", "--config", str(cfg_path), "--dry-run", "--max-iters", "50"]) == 0
    out = capsys.readouterr().out
    n = GPT(load_config(None, cfg_tree(prepared, run)).model).num_params()  # vocab comes from the tokenizer
    assert "parameters:" in out and "FLOPs per token" in out and "memory per process" in out
    assert "50 steps = 6,400 tokens" in out  # 50 x 4 rows x 32 tokens
    assert "4P weights + 4P grads + 8P AdamW" in out
    assert n > 0 and not run.exists()


def test_batch_size_search_with_a_fake_memory_limit():
    for cap, limit in [(1, 64), (5, 64), (37, 64), (64, 64), (100, 64), (200, 1024), (1023, 1024)]:
        calls = []

        def fits(n, cap=cap, calls=calls):
            calls.append(n)
            return n <= cap

        assert fit_micro_batch(fits, limit) == min(cap, limit)
        assert len(calls) <= 2 * math.ceil(math.log2(limit)) + 2  # logarithmic number of trials
    assert fit_micro_batch(lambda n: False, 64) == 0
    assert plan_batch(24, 64, 2) == (16, 2)  # largest divisor of 32 rows per rank that fits
    assert plan_batch(7, 48, 1) == (6, 8)
    assert plan_batch(100, 8, 2) == (4, 1)


def test_batch_size_auto_on_cpu_is_a_clear_error(prepared, tmp_path):
    tree = cfg_tree(prepared, tmp_path / "run")
    cfg = load_config(None, tree | {"data": {"dataset": str(prepared), "batch_size": "auto"}})
    assert cfg.data.batch_size == 0
    with pytest.raises(JojoError, match="--batch-size auto .* needs a CUDA device"):
        run_training(cfg, quiet=True)


def test_global_batch_sets_grad_accum(prepared, tmp_path):
    tree = cfg_tree(prepared, tmp_path / "run", data={"dataset": str(prepared), "batch_size": 2, "global_batch": 8})
    tree["schedule"]["max_steps"] = 2
    res = run_training(load_config(None, tree), quiet=True)
    assert res.tokens_seen == 2 * 8 * 32
    with pytest.raises(JojoError, match="data.global_batch .* multiple of data.batch_size"):
        bad = cfg_tree(prepared, tmp_path / "bad", data={"dataset": str(prepared), "batch_size": 3, "global_batch": 8})
        run_training(load_config(None, bad), quiet=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--logging.patiance=3"], "unknown config key 'logging.patiance' (did you mean 'patience'?)"),
        (["--tensorbord"], "unknown option '--tensorbord' (did you mean '--tensorboard'?)"),
        (["--dtype", "fp8"], "invalid value 'fp8' for 'system.dtype'; allowed values: auto, float32, bfloat16"),
        (["--compile=maybe"], "invalid value 'maybe' for 'system.compile'; allowed values: true, false"),
        (["--batch-size", "lots"], "invalid value 'lots' for 'data.batch_size'; expected int"),
        (["--patience", "-1"], "invalid value -1 for 'logging.patience'; it must be >= 0"),
        (["--schedule.decay", "linear"], "invalid value 'linear' for 'schedule.decay'; allowed values: cosine, wsd"),
        (["--device", "tpu"], "invalid value 'tpu' for 'system.device'; allowed values: auto, cpu, cuda"),
    ],
)
def test_config_errors_name_the_key_and_the_allowed_values(args, message):
    with pytest.raises(JojoError) as exc:
        load_config(None, args)
    assert message in str(exc.value)


def test_flat_flags_land_in_their_sections():
    cfg = load_config(
        "tiny",
        [
            *("--dataset", "d", "--epochs", "2", "--max-iters", "9", "--batch-size", "3", "--learning-rate", "0.01"),
            *("--eval-interval", "7", "--log-interval", "2", "--checkpoint-interval", "4", "--seed", "11"),
            *("--device", "cpu", "--output-checkpoint", "o", "--compile", "--tensorboard", "--patience", "3"),
            *("--global-batch", "12"),
        ],
    )
    assert (cfg.data.dataset, cfg.schedule.epochs, cfg.schedule.max_steps, cfg.data.batch_size) == ("d", 2.0, 9, 3)
    assert (cfg.optimizer.lr, cfg.logging.eval_interval, cfg.logging.log_interval) == (0.01, 7, 2)
    got = (cfg.logging.checkpoint_interval, cfg.system.seed, cfg.system.device, cfg.logging.out_dir)
    assert got == (4, 11, "cpu", "o")
    assert cfg.system.compile and cfg.logging.tensorboard and cfg.logging.patience == 3 and cfg.data.global_batch == 12
