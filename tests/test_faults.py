"""Faults: runs that never collide, a full disk that never costs a traceback, errors that are always one line.

A second writer of a run directory is refused; a lock left by a dead process is taken over; a save that hits a
full disk keeps the previous checkpoint and leaves no temporary directory; kill -9 at random moments (mid-save
included) always leaves `latest` loadable and `--resume` continues; every command given an output path under a
regular file, in a read-only folder or below a missing parent answers in one line; a run that cannot fit is
refused with its numbers before anything is allocated; a resume keeps its checkpoint's architecture.

CPU, tiny models, seconds each; the 20-kill marathon is marked slow (`.ci/run` runs it).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from conftest import config_tree, tiny_model_config
from jojo import checkpoint as ckpt_io
from jojo.checkpoint import load_checkpoint, write_checkpoint
from jojo.cli import main as cli_main
from jojo.config import load_config
from jojo.errors import JojoError, annotate, ensure_dir, environment_message
from jojo.model import GPT
from jojo.train import lock as lock_mod
from jojo.train import run as run_mod
from jojo.train.lock import LOCK_FILE, RunLock, lock_holder

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONWARNINGS": "ignore"}

# A run of a few steps that saves at every other step.
SIZES = {
    "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "data": {"batch_size": 4},
    "schedule": {"max_steps": 4, "warmup_steps": 1},
    "logging": {"eval_interval": 2, "eval_iters": 1, "log_interval": 1, "progress": False},
}


def write_cfg(prepared: Path, run: Path, path: Path, **sections) -> Path:
    path.write_text(json.dumps(config_tree(prepared, run, SIZES, **sections)))
    return path


def cli(capsys, *args) -> tuple[int, list[str], str]:
    """Run `jojo ARGS` in this process: (exit status, non-blank stderr lines, stdout)."""
    capsys.readouterr()
    rc = cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, [line for line in captured.err.splitlines() if line.strip()], captured.out


def assert_one_line(rc: int, lines: list[str], *needles: str, code: int | None = None) -> str:
    assert rc != 0 and (code is None or rc == code), (rc, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("jojo: error: ") and "Traceback" not in lines[0], lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def step_of(run: Path) -> int:
    return json.loads((ckpt_io.resolve_checkpoint(run) / ckpt_io.STATE).read_text())["step"]


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-")))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the messages ------------------------------------------------------------------------------------------
def test_environment_errors_are_one_line_with_the_path_and_the_fix(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        errno.ENOSPC: "no space left",
        errno.EDQUOT: "quota",
        errno.EACCES: "permission denied",
        errno.EPERM: "not permitted",
        errno.EROFS: "read-only file system",
        errno.EMFILE: "ulimit -n",
        errno.ENFILE: "too many open files",
    }
    for code, needle in cases.items():
        msg = environment_message(OSError(code, os.strerror(code), str(tmp_path / "out")))
        assert needle in msg and str(tmp_path) in msg and "\n" not in msg, msg
    msg = environment_message(OSError(errno.ENOTDIR, "Not a directory", str(afile / "sub")))
    assert f"{afile} is a file, not a folder" in msg
    with pytest.raises(NotADirectoryError):  # mkdir's FileExistsError becomes the ENOTDIR the CLI reports
        ensure_dir(afile)
    # context from the code that knew what it wrote; a Rust library's error; torch.save's wrapped OSError
    err = annotate(OSError(errno.ENOSPC, "No space left on device"), doing="writing X", path=tmp_path, after="Y")
    assert "while writing X" in environment_message(err) and "; Y;" in environment_message(err)
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "no space left" in environment_message(rust, where=str(tmp_path))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None
    except RuntimeError as wrapped:
        wrapped.__suppress_context__ = False
        assert "no space left" in environment_message(wrapped)
    # memory: the size asked for and what to reduce
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 51200000000 bytes.")
    msg = environment_message(cpu, "lower --batch-size")
    assert "out of memory" in msg and "47.7 GiB" in msg and "lower --batch-size" in msg
    assert "2.00 GiB" in environment_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "out of memory" in environment_message(MemoryError())
    # anything else is a bug: no message, the traceback stays
    for bug in (
        FileNotFoundError(errno.ENOENT, "No such file", "x"),
        OSError(errno.EIO, "I/O error"),
        RuntimeError("shape mismatch"),
        TypeError("x"),
        KeyError("k"),
    ):
        assert environment_message(bug) is None, bug


def test_the_cli_prints_environment_failures_in_one_line_and_keeps_tracebacks_for_bugs(capsys, monkeypatch):
    from jojo import commands

    def real_oom(args):
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses at once

    monkeypatch.setattr(commands, "cmd_plot", real_oom)
    rc, lines, _ = cli(capsys, "plot", "somewhere")
    assert_one_line(rc, lines, "out of memory", "1048576.0 GiB", code=1)

    def emfile(args):
        raise OSError(errno.EMFILE, "Too many open files", "shard.bin")

    monkeypatch.setattr(commands, "cmd_plot", emfile)
    assert_one_line(*cli(capsys, "plot", "x")[:2], "too many open files", "shard.bin", "ulimit", code=1)

    def bug(args):
        raise RuntimeError("a bug, not the environment")

    monkeypatch.setattr(commands, "cmd_plot", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(["plot", "x"])


def test_available_memory_asks_the_device(monkeypatch):
    from jojo import device

    cpu = device.available_memory(torch.device("cpu"))
    assert cpu is None or cpu > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (5 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 2 * 2**30)
    assert device.available_memory(torch.device("cuda:0")) == 6 * 2**30  # free + cached but unused
    assert device.available_memory(torch.device("mps")) is None


# ---- one writer per run directory ------------------------------------------------------------------------------
def test_second_writer_is_refused_while_the_first_trains(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_cfg(prepared, run, tmp_path / "cfg.json", schedule={"max_steps": 100000, "warmup_steps": 1})
    first = subprocess.Popen(
        [sys.executable, "-m", "jojo.cli", "train", "--config", cfg],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (run / "latest").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (run / "latest").exists(), first.communicate()[1]
        assert lock_holder(run)["pid"] == first.pid
        for args in (["train", "--config", cfg, "--resume"], ["train", "--config", cfg]):
            rc, lines, _ = cli(capsys, *args)
            assert_one_line(rc, lines, f"pid {first.pid}", "jojo train --config", "in use", code=2)
        rc, lines, _ = cli(capsys, "sft", "--resume", "--out", run, "--device", "cpu")
        assert_one_line(rc, lines, f"pid {first.pid}", code=2)
        # read-only commands need no lock and keep working during training
        rc, _, out = cli(capsys, "generate", run, "--prompt", "Once", "--max-tokens", "4", "--device", "cpu")
        assert rc == 0 and out.startswith("Once")
    finally:
        first.send_signal(signal.SIGTERM)  # saves and exits cleanly
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert not (run / LOCK_FILE).exists()  # released on the way out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows].count("end") == 1  # the refused writers wrote nothing
    step = step_of(run)
    rc, lines, out = cli(capsys, "train", "--config", cfg, "--resume", "--max-iters", step + 1)
    assert rc == 0, lines
    assert f"resuming {run}" in out and "schedule.max_steps=" in out


def test_the_lock_is_released_on_errors_and_ctrl_c(prepared, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), RunLock(run):
        assert lock_holder(run)["pid"] == os.getpid()
        raise KeyboardInterrupt
    assert not (run / LOCK_FILE).exists() and not run.exists()  # it made the folder and wrote nothing
    cfg = load_config(None, config_tree(prepared, run, SIZES))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_mod.run_training(cfg)
    assert not run.exists()
    monkeypatch.undo()
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(JojoError, match="no training budget"):
        run_mod.run_training(load_config(None, config_tree(prepared, run, SIZES, schedule={"max_steps": 0})))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # a folder it did not make is left as it was


def test_a_stale_lock_is_taken_over_with_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for record, needle in (
        ({"pid": dead_pid(), "host": socket.gethostname(), "command": "jojo train --out run"}, "jojo train --out"),
        ({"pid": 1, "host": "elsewhere.example", "command": "jojo sft"}, "on host elsewhere.example"),
    ):
        (run / LOCK_FILE).write_text(json.dumps(record))
        said = []
        with RunLock(run, say=said.append):
            assert lock_holder(run)["pid"] == os.getpid()
        assert len(said) == 1 and "taking over the lock" in said[0] and f"pid {record['pid']}" in said[0], said
        assert needle in said[0]
        assert not (run / LOCK_FILE).exists()


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "x"}))
    with pytest.raises(JojoError, match=f"pid {os.getppid()}"):
        RunLock(run).acquire()
    (run / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "command": "x"}))
    said = []
    RunLock(run, say=said.append).acquire().release()
    assert "taking over" in said[0]


def test_under_torchrun_only_rank_zero_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with RunLock(tmp_path / "run"):
        assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    with RunLock(tmp_path / "run"), pytest.raises(JojoError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()


def test_a_full_disk_in_the_run_names_the_run_and_its_last_checkpoint(tmp_path):
    with pytest.raises(OSError) as info, RunLock(tmp_path / "run"):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write() names no file
    msg = environment_message(info.value)
    assert str(tmp_path / "run") in msg and "no checkpoint of this run is complete yet" in msg


# ---- a full disk during a save ------------------------------------------------------------------------------
def _enospc_in_torch_save(calls):
    """torch.save as it fails on a full disk: part of the file written, then a RuntimeError around the OSError."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real(obj, f, *args, **kwargs)
        f.write(b"\0" * 4096)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")  # noqa: B904

    return save


def test_no_space_during_a_save_keeps_the_previous_checkpoint(prepared, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    cfg = write_cfg(prepared, run, tmp_path / "cfg.json")
    monkeypatch.setattr(torch, "save", _enospc_in_torch_save([]))
    rc, lines, _ = cli(capsys, "train", "--config", cfg)
    monkeypatch.undo()
    assert_one_line(rc, lines, "no space left", "step-000004 (optimizer.pt)", f"{run}/step-000002", "--resume", code=1)
    assert leftovers(run) == [] and not (run / LOCK_FILE).exists()
    assert load_checkpoint(run)[2]["step"] == 2
    rc, lines, _ = cli(capsys, "train", "--config", cfg, "--resume")
    assert rc == 0, lines
    assert step_of(run) == 4


def test_a_failed_write_removes_its_temporary_directory(tmp_path, tokenizer, monkeypatch):
    model = GPT(tiny_model_config("gpt2"))
    run = tmp_path / "run"
    write_checkpoint(run, 1, model, tokenizer, {})

    def rust_enospc(*args, **kwargs):
        Path(args[1]).write_bytes(b"\0" * 1000)  # a partial file, as a real full disk leaves
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt_io, "save_file", rust_enospc)
    with pytest.raises(OSError) as info:
        write_checkpoint(run, 2, model, tokenizer, {})
    msg = environment_message(info.value)
    assert "step-000002 (model.safetensors)" in msg and "partial checkpoint was removed" in msg
    assert f"{run}/step-000001" in msg
    assert leftovers(run) == []

    def bug(*args, **kwargs):
        raise TypeError("a bug in the writer")

    monkeypatch.setattr(ckpt_io, "save_file", bug)
    with pytest.raises(TypeError):  # a bug keeps its traceback
        write_checkpoint(run, 2, model, tokenizer, {})
    assert leftovers(run) == []
    monkeypatch.undo()
    assert load_checkpoint(run)[2]["step"] == 1


def _mount(args: list[str]) -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_a_real_full_disk(prepared, tmp_path, capsys):
    """A tmpfs that holds one checkpoint and not two (skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cfg_model = tiny_model_config("gpt2", **SIZES["model"])
    weights = sum(t.numel() * t.element_size() for t in ckpt_io.unique_state_dict(GPT(cfg_model)).values())
    one = 3 * weights + (prepared / "tokenizer.json").stat().st_size + 40_000  # weights + AdamW's two moments
    size = int(1.5 * one) + 128_000  # + loss.png and metrics.jsonl
    if not _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        run = disk / "run"
        cfg = write_cfg(prepared, run, tmp_path / "cfg.json")
        rc, lines, _ = cli(capsys, "train", "--config", cfg)
        assert_one_line(rc, lines, "no space left", f"{run}/step-000002", code=1)
        assert leftovers(run) == []
        assert load_checkpoint(run)[2]["step"] == 2
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_prepare_on_a_full_disk_leaves_no_shards(prepared, corpus_file, tmp_path, capsys, monkeypatch):
    from jojo.data import prepare as prepare_mod

    real_write = prepare_mod.ShardWriter.write
    calls = []

    def write(self, tokens):
        calls.append(1)
        real_write(self, tokens)
        if len(calls) == 2:  # the OS names no file when a write() finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare_mod.ShardWriter, "write", write)
    out = tmp_path / "data"
    args = ["prepare", "--source", corpus_file, "--tokenizer", prepared / "tokenizer.json", "--workers", 1]
    rc, lines, _ = cli(capsys, *args, "--out", out)
    assert_one_line(rc, lines, "no space left", f"holding {out} while writing token shards", code=1)
    assert sorted(p.name for p in out.iterdir()) == []  # no shard, no .tmp, no meta.json
    monkeypatch.undo()
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]):
        return  # the real full disk needs mount permission
    try:
        rc, lines, _ = cli(capsys, *args, "--out", disk / "data")
        assert_one_line(rc, lines, "no space left", f"{disk / 'data'}", code=1)
        assert [p.name for p in (disk / "data").iterdir()] == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---- kill -9 at random moments ---------------------------------------------------------------------------------
# The child pauses briefly at three moments of each save (and says so in a log), so that a kill can land there:
# after the weights are written and before the rest, before the rename into place, before `latest` moves.
CHILD = r"""
import os, sys, time
import jojo.checkpoint as ck
log, pause = os.environ["FAULT_LOG"], float(os.environ["FAULT_PAUSE"])

def spot(name):
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()} {name}\n")
    time.sleep(pause)

real_save_file, real_fsync_tree, real_point = ck.save_file, ck._fsync_tree, ck._point

def save_file(*args, **kwargs):
    real_save_file(*args, **kwargs)
    spot("mid-save")

def fsync_tree(path):
    spot("before-rename")
    real_fsync_tree(path)

def point(run_dir, link, target):
    if link == "latest":
        spot("before-link")
    real_point(run_dir, link, target)

ck.save_file, ck._fsync_tree, ck._point = save_file, fsync_tree, point
from jojo.cli import main
sys.exit(main(sys.argv[1:]))
"""
MOMENTS = ("anytime", "mid-save", "before-rename", "before-link")


def _kill_at_random_moments(prepared, tmp_path, kills: int, seed: int) -> None:
    run = tmp_path / "run"
    cfg = write_cfg(prepared, run, tmp_path / "cfg.json", schedule={"max_steps": 100000, "warmup_steps": 1})
    log = tmp_path / "spots.log"
    env = {**ENV, "FAULT_LOG": str(log), "FAULT_PAUSE": "0.1"}
    rng = random.Random(seed)
    moments = [MOMENTS[1 + i % 3] if i < 3 else rng.choice(MOMENTS) for i in range(kills)]  # every spot at least once
    for moment in moments:
        args = [sys.executable, "-c", CHILD, "train", "--config", str(cfg)]
        if (run / "latest").exists():
            args.append("--resume")
        child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        if moment == "anytime":
            time.sleep(rng.uniform(0.5, 8.0))  # start-up, training, evaluation or a save
        else:  # until one save completed, the moment in a child's second save, so that `latest` comes to exist
            want, times = f"{child.pid} {moment}\n", 1 if (run / "latest").exists() else 2
            while child.poll() is None and time.time() < deadline:
                if log.exists() and log.read_text().count(want) >= times:
                    break
                time.sleep(0.01)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
        if (run / "latest").exists():
            model, tok, state = load_checkpoint(run)  # never half-written
            assert state["step"] >= 2
    assert (run / "latest").exists()
    step = step_of(run)
    done = subprocess.run(
        [sys.executable, "-m", "jojo.cli", "train", "--config", cfg, "--resume", "--max-iters", str(step + 2)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert step_of(run) == step + 2 and leftovers(run) == [] and not (run / LOCK_FILE).exists()


def test_kill_9_mid_save_leaves_latest_loadable_and_resume_continues(prepared, tmp_path):
    _kill_at_random_moments(prepared, tmp_path, kills=3, seed=1)


@pytest.mark.slow
def test_kill_9_at_20_random_moments(prepared, tmp_path):
    _kill_at_random_moments(prepared, tmp_path, kills=20, seed=15)


# ---- output paths that cannot be written -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory, tokenizer) -> Path:
    """A checkpoint (a context long enough for chats) with a metrics.jsonl, for the commands that read one."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("ckpt") / "run"
    write_checkpoint(run, 1, GPT(tiny_model_config("gpt2", block_size=256, n_embd=32)), tokenizer, {})
    (run / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 3.0}) + "\n")
    return run


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot write to, even as root: a read-only bind mount (EROFS), else an immutable
    folder (chattr +i: EPERM); as another user, chmod (EACCES)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro, "permission denied"
        ro.chmod(0o755)
        return
    if _mount(["--bind", str(ro), str(ro)]):
        if _mount(["-o", "remount,bind,ro", str(ro)]):
            yield ro, "read-only file system"
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
            return
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0:
        yield ro, "not permitted"
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        return
    pytest.skip("no way to make a read-only folder here")


def _command(name: str, out: Path, prepared: Path, ckpt: Path, corpus_file: Path, cfg: Path) -> list:
    return {
        "prepare": ["prepare", "--source", corpus_file, "--tokenizer", prepared / "tokenizer.json", "--out", out],
        "tokenizer": ["tokenizer", "train", "--input", corpus_file, "--vocab-size", 300, "--out", out],
        "train": ["train", "--config", cfg, "--out", out, "--max-iters", 2],
        "sft": [
            "sft",
            ckpt,
            "--out",
            out,
            "--max-iters",
            1,
            "--embedded-chats",
            40,
            "--device",
            "cpu",
            "--logging.progress=false",
            "--batch-size",
            2,
        ],  # fmt: skip
        "export-hf": ["export", "hf", ckpt, out],
        "export-gguf": ["export", "gguf", ckpt, out / "model.gguf"],
        "upload": ["upload", ckpt, "--repo-name", "x", "--dry-run", "--out", out],
        "generate": [
            "generate",
            ckpt,
            "--prompt",
            "Once",
            "--max-tokens",
            2,
            "--device",
            "cpu",
            "--output",
            out / "samples.txt",
        ],  # fmt: skip
        "plot": ["plot", ckpt, "--out", out / "loss.png"],
        "save-config": ["train", "--save-config", out / "cfg.json"],
        "quickstart": ["quickstart", "--out", out],
    }[name]


COMMANDS = ["prepare", "tokenizer", "train", "sft", "export-hf", "export-gguf", "upload", "generate", "plot",
            "save-config", "quickstart"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(d.text for d in corpus[:200]))
    return path


@pytest.mark.parametrize("where", ["under-a-file", "read-only", "missing-parent"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_output_path_fault_answers_in_one_line(
    command, where, prepared, ckpt_run, corpus_file, tmp_path, capsys, request
):
    if command == "export-gguf":
        pytest.importorskip("gguf")
    if where == "missing-parent" and command == "quickstart":
        pytest.skip("the whole quickstart takes minutes; it makes missing parents as the others do")
    cfg = write_cfg(prepared, tmp_path / "unused", tmp_path / "cfg.json")
    if where == "under-a-file":
        (tmp_path / "afile").write_text("a regular file")
        out, needles = tmp_path / "afile" / "sub", ["afile is a file, not a folder"]
    elif where == "read-only":
        ro, needle = request.getfixturevalue("readonly_dir")
        out, needles = ro / "sub", [needle, str(ro)]
    else:
        out = tmp_path / "no" / "such" / "folder"
    rc, lines, _ = cli(capsys, *_command(command, out, prepared, ckpt_run, corpus_file, cfg))
    if where == "missing-parent":
        assert rc == 0 and not [line for line in lines if "error" in line], lines  # the parents are made
        assert out.exists()
    else:
        assert_one_line(rc, lines, *needles, code=1)


# ---- what cannot fit, refused before allocating -----------------------------------------------------------------
def test_an_impossible_size_is_refused_with_numbers_before_allocating(prepared, tmp_path, capsys, monkeypatch):
    cfg = write_cfg(prepared, tmp_path / "run", tmp_path / "cfg.json")
    built = []
    real_gpt = run_mod.GPT

    def spy(config):
        model = real_gpt(config)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(run_mod, "GPT", spy)
    train_tokens = json.loads((prepared / "meta.json").read_text())["splits"]["train"]["tokens"]
    for extra in ([], ["--force"], ["--dry-run"]):
        rc, lines, _ = cli(capsys, "train", "--config", cfg, "--model.block_size=100000000", *extra)
        assert_one_line(rc, lines, "model.block_size (100,000,000)", f"({train_tokens:,} tokens", code=2)
    # a model that fits the data but not the memory: refused with the estimate; --force skips the check
    monkeypatch.setattr(run_mod, "available_memory", lambda device: 2**20)
    rc, lines, _ = cli(capsys, "train", "--config", cfg)
    assert_one_line(rc, lines, "GiB per process", "0.0 GiB available", "--force", code=2)
    assert built == ["meta"] and not (tmp_path / "run").exists()  # nothing allocated, nothing written
    rc, _, out = cli(capsys, "train", "--config", cfg, "--dry-run")
    assert rc == 0 and "the estimate does not fit" in out
    rc, lines, _ = cli(capsys, "train", "--config", cfg, "--force")
    assert rc == 0, lines
    assert built[-1] == "cpu"


# ---- a resume keeps its architecture -------------------------------------------------------------------------
def test_a_resume_keeps_its_architecture_and_says_what_it_honours(prepared, tmp_path, capsys, ckpt_run):
    run = tmp_path / "run"
    cfg = write_cfg(prepared, run, tmp_path / "cfg.json", schedule={"max_steps": 2, "warmup_steps": 1})
    assert cli(capsys, "train", "--config", cfg)[0] == 0
    rc, lines, _ = cli(capsys, "train", "--config", cfg, "--resume", "--model.n_layer=7", "--max-iters", 4)
    assert_one_line(rc, lines, "model.n_layer is 2 there, not 7", "step-000002", code=2)
    rc, lines, _ = cli(capsys, "train", "--config", cfg, "--resume", "--block-size", 64, "--max-iters", 4)
    assert_one_line(rc, lines, "model.block_size is 32 there, not 64", code=2)
    rc, lines, _ = cli(
        capsys, "train", "--init-from", run, "--config", cfg, "--out", tmp_path / "ft", "--model.n_embd=64"
    )
    assert_one_line(rc, lines, "--init-from takes the architecture", "model.n_embd is 32 there, not 64", code=2)
    rc, lines, _ = cli(capsys, "sft", ckpt_run, "--out", tmp_path / "sft", "--model.n_layer=7", "--device", "cpu")
    assert_one_line(rc, lines, "model.n_layer is 2 there, not 7", code=2)
    # the same value is no change; other overrides are honoured and listed in one line
    rc, lines, out = cli(
        capsys, "train", "--config", cfg, "--resume", "--model.n_layer=2", "--max-iters", 4, "--learning-rate", 1e-3
    )
    assert rc == 0, lines
    said = [line for line in out.splitlines() if line.startswith("resuming")]
    assert len(said) == 1 and "architecture kept (gpt2, 2 layers x 32, context 32)" in said[0], out
    assert "schedule.max_steps=4" in said[0] and "optimizer.lr=0.001" in said[0]
    assert step_of(run) == 4
