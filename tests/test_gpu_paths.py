"""The CUDA code paths, checked on CPU: MFU's peak table, the auto dtype, the `--batch-size auto` reserve, the
activation-memory formula, host reads in the training loop, recompilation at evaluation, the attention call
FlashAttention needs, and the GPU benchmark script. The same paths on a real GPU: tests/test_gpu.py."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

from conftest import config_tree, tiny_model_config
from jojo.config import ModelConfig, SystemConfig, load_config, parse_overrides
from jojo.data.loader import BatchLoader
from jojo.device import pick_dtype
from jojo.model import GPT
from jojo.train import run as run_mod
from jojo.train.run import memory_estimate, resolve_batch, run_training
from jojo.train.system import (
    PEAK_FLOPS,
    Runtime,
    activation_bytes,
    gpu_model,
    optimizer_state_bytes,
    peak_flops,
    peak_flops_of,
    plan_batch,
    setup_runtime,
)

ROOT = Path(__file__).resolve().parents[1]

# ---- MFU's peak FLOP/s -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100 sxm"),
        ("NVIDIA H100 PCIe", "h100 pcie"),
        ("NVIDIA H100 NVL", "h100 nvl"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200 nvl"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L40", "l40"),
        ("NVIDIA GeForce RTX 3060", "rtx 3060"),
        ("NVIDIA GeForce RTX 3090", "rtx 3090"),
        ("NVIDIA GeForce RTX 4060 Ti", "rtx 4060 ti"),
        ("NVIDIA GeForce RTX 4090", "rtx 4090"),
        ("Tesla V100-SXM2-16GB", "v100 sxm2"),
        ("Tesla V100-PCIE-32GB", "v100 pcie"),
        ("Tesla V100S-PCIE-32GB", "v100s"),
        ("Tesla T4", "t4"),
        # other clocks or SM counts than the listed part: no peak rather than a wrong one
        ("NVIDIA GeForce RTX 3080 Ti", None),
        ("NVIDIA GeForce RTX 4090 D", None),
        ("NVIDIA GeForce RTX 4070 SUPER", None),
        ("NVIDIA GeForce RTX 3080 Laptop GPU", None),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
        ("NVIDIA RTX A6000", None),
        ("NVIDIA RTX 6000 Ada Generation", None),
        ("Tesla V100-SXM3-32GB", None),
        ("NVIDIA B200", None),
        ("AMD Instinct MI300X", None),
    ],
)
def test_gpu_names_map_to_their_peak(name, key):
    assert gpu_model(name) == key
    assert key is None or key in PEAK_FLOPS


def test_peak_flops_per_dtype():
    bf16, fp16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert peak_flops_of("NVIDIA H100 80GB HBM3", bf16) == 989.4e12
    assert peak_flops_of("NVIDIA H100 PCIe", bf16) == 756.5e12  # not the SXM figure
    assert peak_flops_of("NVIDIA H200", bf16) == 989.4e12
    assert peak_flops_of("NVIDIA A100-SXM4-40GB", bf16) == peak_flops_of("NVIDIA A100 80GB PCIe", bf16) == 312e12
    assert peak_flops_of("NVIDIA A100-SXM4-40GB", f32, tf32=True) == 156e12
    assert peak_flops_of("NVIDIA A100-SXM4-40GB", f32, tf32=False) is None  # plain FP32: not listed
    assert peak_flops_of("NVIDIA GeForce RTX 4090", bf16) == 165.2e12  # FP32 accumulate, not 330
    assert peak_flops_of("Tesla V100-SXM2-16GB", bf16) is None  # emulated bf16: no meaningful peak
    assert peak_flops_of("Tesla V100-SXM2-16GB", fp16) == 125e12
    assert peak_flops_of("Tesla T4", f32, tf32=True) == peak_flops_of("Tesla T4", f32, tf32=False) == 8.1e12
    assert peak_flops_of("Some Future GPU", bf16) is None
    assert peak_flops(torch.device("cpu"), bf16) is None
    for bf, fp, f in PEAK_FLOPS.values():  # 16-bit is twice TF32 on every Ampere+ part; bf16 == fp16
        assert bf is None or (bf == fp and 1.9 < bf / f < 2.1)


def test_auto_dtype_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts by default
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))  # V100
    assert pick_dtype("auto", cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100
    assert pick_dtype("auto", cuda) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_dtype_on_cpu_is_bf16_for_training_only_where_the_cpu_has_it(monkeypatch, has_bf16):
    import jojo.device as device_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert device_mod.cpu_native_bf16() is has_bf16
    assert pick_dtype("auto", cpu, training=True) == (torch.bfloat16 if has_bf16 else torch.float32)
    assert pick_dtype("auto", cpu) == torch.float32  # evaluation and generation on a CPU stay float32
    assert pick_dtype("float32", cpu, training=True) == torch.float32
    rt = setup_runtime(SystemConfig(device="cpu"))
    assert rt.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    assert rt.validation_dtype == torch.float32  # what `jojo eval` picks on the same CPU


def test_compile_auto_only_for_long_cpu_bf16_runs(monkeypatch):
    from jojo.train.system import COMPILE_MIN_SECONDS, COMPILE_MIN_STEPS, resolve_compile

    cpu_bf16 = Runtime(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    assert resolve_compile(None, cpu_bf16, COMPILE_MIN_STEPS)
    assert not resolve_compile(None, cpu_bf16, COMPILE_MIN_STEPS - 1)
    assert resolve_compile(None, cpu_bf16, 10, COMPILE_MIN_SECONDS)  # a budget decides, not the step count
    assert not resolve_compile(None, cpu_bf16, 10_000, COMPILE_MIN_SECONDS - 1)
    assert not resolve_compile(None, Runtime(torch.device("cpu"), torch.float32), 10_000)  # no gain in float32
    assert not resolve_compile(None, Runtime(torch.device("cuda"), torch.bfloat16), 10_000)  # GPUs: --compile
    assert resolve_compile(True, Runtime(torch.device("cpu"), torch.float32), 1)
    assert not resolve_compile(False, cpu_bf16, 10_000)
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler for inductor
    assert not resolve_compile(None, cpu_bf16, 10_000)
    assert load_config("tiny", {"system": {"compile": "auto"}}).system.compile is None
    assert load_config("tiny", parse_overrides(["--no-compile"])).system.compile is False
    assert load_config("tiny", parse_overrides(["--compile"])).system.compile is True


# ---- memory: the --batch-size auto reserve and the activation formula ------------------------------------


def test_batch_size_auto_leaves_room_for_the_optimizer_state(monkeypatch):
    """A fake GPU: each row costs `row` bytes, the search must keep the reserve (optimizer state, gradients
    held across micro-steps, headroom) free, so that the first optimizer step does not run out of memory."""
    total, row = 40 * 2**30, 300 * 2**20
    reserves = []

    def fake_fits(model, rt, block_size, vocab_size, reserve_bytes=0):
        reserves.append(reserve_bytes)
        return lambda n: n * row + reserve_bytes <= total

    monkeypatch.setattr(run_mod, "cuda_fits", fake_fits)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=total))
    cfg = load_config(None, {"model": {"n_layer": 2, "n_embd": 64, "n_head": 2}, "data": {"batch_size": 0}})
    model = GPT(cfg.model)
    P = model.num_params()
    resolved = resolve_batch(cfg, Runtime(torch.device("cuda"), torch.bfloat16), model)
    assert reserves == [8 * P + 4 * P + int(0.05 * total)]  # AdamW state + gradients + 5% headroom
    micro = resolved.data.batch_size
    assert micro == (total - reserves[0]) // row
    assert optimizer_state_bytes(model, "muon") < optimizer_state_bytes(model, "adamw") == 8 * P


def saved_activation_bytes(cfg: ModelConfig, rows: int, dtype: torch.dtype) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (each storage once), leaving out the
    weights and their autocast copies: activations have a leading dimension of `rows` or rows x T."""
    model = GPT(cfg)
    seen = {}

    def pack(t):
        if t.dim() and t.shape[0] in (rows, rows * cfg.block_size):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (rows, cfg.block_size))
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_formula_against_the_tensors_autograd_saves(family, dtype):
    """Per layer: the difference between a 4-layer and a 2-layer model, measured vs `activation_bytes`.
    Sizes with rows x T = 300 (a factor 25 no weight dimension has) so weights are never mistaken for activations."""
    kw = dict(vocab_size=640, block_size=100, n_head=4, n_embd=128)
    if family == "llama":
        kw["n_kv_head"] = 2
    two, four = (ModelConfig(family=family, n_layer=n, **kw) for n in (2, 4))
    measured = saved_activation_bytes(four, 3, dtype) - saved_activation_bytes(two, 3, dtype)
    formula = activation_bytes(four, 3, dtype) - activation_bytes(two, 3, dtype)
    assert 0.85 < measured / formula < 1.15, (measured, formula)


def test_memory_estimate_adds_up():
    cfg = load_config("gpt2-124m", ["--batch-size", "4", "--global-batch", "0"])
    model = GPT(cfg.model)
    est = memory_estimate(cfg, model, Runtime(torch.device("cpu"), torch.bfloat16))
    P = model.num_params()
    assert est["weights"] == est["gradients"] == 4 * P and est["optimizer"] == 8 * P
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))
    # the loss's float32 logits and their gradients dominate at GPT-2's vocabulary: 12 bytes x B x T x V
    assert est["activations"] > 12 * 4 * 1024 * 50304


def test_gpt2_124m_preset_keeps_half_a_million_tokens_per_step():
    cfg = load_config("gpt2-124m")
    assert cfg.data.global_batch * cfg.model.block_size == 524288
    for world in (1, 8):  # with 8 GPUs the step stays 512 rows, not 8 x 512
        micro, accum = plan_batch(cfg.data.batch_size, cfg.data.global_batch, world)
        assert micro * accum * world == 512


# ---- the training loop: host reads and recompilation -----------------------------------------------------


def engine_tree(prepared, out, **sections) -> dict:
    base = {
        "model": {"block_size": 32, "n_head": 2, "n_embd": 32},
        "data": {"batch_size": 4},
        "system": {"seed": 3},
        "logging": {"eval_iters": 2, "sample_tokens": 0},
    }
    return config_tree(prepared, out, base, **sections)


def test_training_steps_read_nothing_back_from_the_device(prepared, tmp_path, monkeypatch):
    """On a GPU every .item(), float(t), int(t), bool(t) or .tolist() waits for the device. Jojo's own code may
    read values only at logging, evaluation and checkpoints: a run of 8 steps reads as often as one of 4."""
    jojo_src = str(ROOT / "src" / "jojo")
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(jojo_src):
                reads.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def count(steps: int) -> list[str]:
        reads.clear()
        tree = engine_tree(prepared, tmp_path / f"s{steps}", schedule={"max_steps": steps, "warmup_steps": 1})
        tree["logging"].update(log_interval=1000, eval_interval=1000)
        run_training(load_config(None, tree), quiet=True)
        return list(reads)

    four, eight = count(4), count(8)
    assert len(four) == len(eight), sorted(set(eight) - set(four)) or eight


def test_the_logits_are_freed_before_backward(prepared, tmp_path, monkeypatch):
    """[B, T, V] logits (1.6 GB for GPT-2 124M at batch 16 in bf16) must not stay alive through the backward pass:
    the loop keeps only the loss."""
    real = GPT.forward
    alive = []

    def spy(self, *a, **k):
        logits, loss = real(self, *a, **k)
        if loss is not None and torch.is_grad_enabled():
            ref = weakref.ref(logits)
            loss.register_hook(lambda g: alive.append(ref() is not None))  # runs as backward starts
        return logits, loss

    monkeypatch.setattr(GPT, "forward", spy)
    tree = engine_tree(prepared, tmp_path / "run", schedule={"max_steps": 2, "warmup_steps": 1})
    run_training(load_config(None, tree), quiet=True)
    assert alive and not any(alive)


def test_no_recompilation_at_evaluation_or_on_its_smaller_last_batch(prepared, tmp_path, monkeypatch):
    """torch.compile on (with dynamo's eager backend, so no C++ compiler is needed): evaluations over a validation
    split whose last batch is smaller run between steps, and dynamo must not recompile. They run the uncompiled
    module; training batches always have the same shape (the loader drops an epoch's incomplete tail)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    # a large batch keeps the whole-split evaluation short; one that does not divide the split leaves a tail
    batch = next(b for b in range(24, 64) if BatchLoader(prepared, "val", b, 32).rows_per_epoch % b)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **k: real_compile(model, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    tree = engine_tree(prepared, tmp_path / "run", data={"dataset": str(prepared), "batch_size": batch})
    tree["schedule"].update(max_steps=3, warmup_steps=1)
    tree["logging"].update(eval_interval=2, eval_iters=0, sample_tokens=48)  # sampling decodes in between too
    tree["system"]["compile"] = True
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            res = run_training(load_config(None, tree), quiet=True)
        assert counters["frames"]["ok"] >= 1  # the training forward really went through dynamo
    finally:
        torch._dynamo.reset()
    assert res.step == 3 and res.val_loss is not None


# ---- attention ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_plain_causal_attention_passes_no_mask(family, monkeypatch):
    """FlashAttention takes `is_causal=True` without an explicit mask; a boolean mask would send SDPA to a
    slower kernel. Training and a prefill from position 0 must call it that way."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal, dropout_p))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = GPT(tiny_model_config(family))
    x = torch.randint(0, 512, (2, 16))
    model(x, x)
    with torch.no_grad():
        model(x, cache=model.new_cache(2))
    assert calls and all(c == (True, True, 0.0) for c in calls), calls


# ---- the GPU benchmark, on CPU -----------------------------------------------------------------------------


def test_gpu_train_benchmark_runs_on_cpu(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "benchmarks" / "gpu_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--layers", "2", "--dim", "64", "--heads", "2", "--ctx", "32", "--vocab", "256"]
    argv += ["--batch", "2", "--steps", "2", "--warmup", "1", "--no-compile", "--json", str(out)]
    bench.main(argv)
    res = json.loads(out.read_text())
    assert res["tokens_per_second"] > 0 and res["mfu"] is None and res["device"] == "cpu"
    assert res["flops_per_token"] == GPT(bench.model_config(bench.parse(argv))).flops_per_token()
