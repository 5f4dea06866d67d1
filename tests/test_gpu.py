"""The CUDA paths, on a real GPU: precision, compile, fused optimizers, `--batch-size auto` and the memory
estimate, resume, decode and Muon. Every test is skipped without CUDA (`scripts/gpu_check.sh` runs this file and
reports the skips). Figures worth keeping go to the JUnit XML through `record_property`.

TF32 is turned off for the comparisons against CPU results (the autouse fixture), so float32 on the GPU means
float32; training runs that call `setup_runtime` turn it back on as `system.tf32` says, and the fixture restores
the setting afterwards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import config_tree, tiny_model_config
from jojo.checkpoint import resolve_checkpoint
from jojo.config import OptimizerConfig, load_config
from jojo.infer.engine import SamplingConfig, generate
from jojo.model import GPT
from jojo.train.optim import Muon, build_optimizer, orthogonalize
from jojo.train.run import memory_estimate, resolve_batch, run_training
from jojo.train.system import Runtime

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32_and_a_clean_gpu():
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    torch._dynamo.reset()
    yield
    torch.set_float32_matmul_precision(precision)
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def gpu_tree(prepared, out, **sections) -> dict:
    base = {"system": {"device": "cuda", "seed": 5, "dtype": "bfloat16"}, "logging": {"log_interval": 1}}
    return config_tree(prepared, out, base, **sections)


def train_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def one_step(model, opt, rt, x, scaler=None):
    """The loop's step (jojo.train.loop.fit): autocast forward, (scaled) backward, unscale, clip, step."""
    with rt.autocast():
        loss = model(x[:, :-1], x[:, 1:])[1]
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        for o in opt.optimizers:
            scaler.unscale_(o)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if scaler:
        for o in opt.optimizers:
            scaler.step(o)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# ---- precision ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_autocast_step(family):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(family)).to(CUDA)
    rt = Runtime(CUDA, torch.bfloat16)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3), "cuda")
    x = torch.randint(0, 512, (4, 65), device=CUDA)
    before = model.wte.weight.detach().clone()
    with rt.autocast():
        logits, loss = model(x[:, :-1], x[:, 1:])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # float32 master weights and grads
    opt.step()
    assert not torch.equal(before, model.wte.weight)
    losses = [float(one_step(model, opt, rt, x)) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fp16_grad_scaler_skips_an_overflow_then_trains(optimizer):
    torch.manual_seed(0)
    model = GPT(tiny_model_config("llama")).to(CUDA)
    rt = Runtime(CUDA, torch.float16)
    assert rt.grad_scaler() is not None and rt.grad_scaler().is_enabled()
    opt = build_optimizer(model, OptimizerConfig(name=optimizer, lr=3e-3), "cuda")
    x = torch.randint(0, 512, (4, 65), device=CUDA)
    # A scale of 2^40 overflows float16 gradients for certain: the step must be skipped and the scale halved.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(model, opt, rt, x, scaler)
    assert scaler.get_scale() == 2.0**39
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    scaler = rt.grad_scaler()
    losses = [float(one_step(model, opt, rt, x, scaler)) for _ in range(25)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses[::5]
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0


def test_fp16_training_run_keeps_its_scaler(prepared, tmp_path):
    run = tmp_path / "fp16"
    tree = gpu_tree(prepared, run, system={"device": "cuda", "dtype": "float16", "seed": 5})
    res = run_training(load_config(None, tree), quiet=True)
    losses = train_losses(run)
    assert res.step == 30 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    saved = torch.load(resolve_checkpoint(run) / "optimizer.pt", map_location="cpu", weights_only=True)
    assert "scaler" in saved and float(saved["scaler"]["scale"]) > 0


# ---- compile -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_forward_matches_eager(family):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(family)).to(CUDA).eval()
    compiled = torch.compile(model)
    x = torch.randint(0, 512, (4, 64), device=CUDA)
    with torch.no_grad():
        eager32, loss32 = model(x, x)
        comp32, closs32 = compiled(x, x)
        torch.testing.assert_close(comp32, eager32, atol=1e-4, rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # autocast entered outside the compiled graph
            eager16, loss16 = model(x, x)
            comp16, closs16 = compiled(x, x)
    assert comp16.dtype == eager16.dtype == torch.bfloat16
    torch.testing.assert_close(comp16.float(), eager16.float(), atol=5e-2, rtol=5e-2)
    assert abs(float(closs16) - float(loss16)) < 2e-2 * float(loss16)


def test_no_recompilation_across_steps_and_evaluations(prepared, tmp_path):
    """Compiled training with evaluations (whose last batch is smaller) in between: no recompilation. The
    validation runs the uncompiled module, and training batches are always full (the loader drops the tail)."""
    import torch._dynamo

    run = tmp_path / "compiled"
    tree = gpu_tree(prepared, run, schedule={"max_steps": 6, "warmup_steps": 2}, system={"compile": True})
    tree["logging"].update(eval_interval=2, eval_iters=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        res = run_training(load_config(None, tree), quiet=True)
    assert res.step == 6 and res.val_loss is not None


# ---- optimizers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_fused_adamw_on_cuda(name):
    model = GPT(tiny_model_config("llama")).to(CUDA)
    opt = build_optimizer(model, OptimizerConfig(name=name), "cuda")
    adamw = opt.optimizers[-1]
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] is True
    assert (name == "muon") == isinstance(opt.optimizers[0], Muon)
    x = torch.randint(0, 512, (2, 65), device=CUDA)
    assert torch.isfinite(one_step(model, opt, Runtime(CUDA, torch.bfloat16), x))


def test_muon_on_cuda_matches_cpu_and_trains():
    g = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(orthogonalize(g.to(CUDA)).cpu(), orthogonalize(g), atol=2e-4, rtol=2e-3)
    torch.manual_seed(0)
    model = GPT(tiny_model_config("llama", block_size=16, vocab_size=64)).to(CUDA)
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=3e-3, muon_lr=0.02), "cuda")
    x = torch.randint(0, 64, (4, 17), device=CUDA)
    losses = [float(one_step(model, opt, Runtime(CUDA, torch.bfloat16), x)) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses[::5]


# ---- memory: --batch-size auto and the estimate ------------------------------------------------------------


def test_batch_size_auto_finds_a_size_that_trains(prepared, tmp_path, record_property):
    """Under a memory cap the search must stop below it, and a real step (optimizer state included) at the
    size it found must not run out of memory."""
    frac = 0.25
    cap = frac * torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction(frac, CUDA)
    try:
        tree = gpu_tree(prepared, tmp_path / "auto", data={"dataset": str(prepared), "batch_size": "auto"})
        tree["model"].update(n_layer=6, n_head=8, n_embd=512, block_size=1024, vocab_size=16384)
        cfg = load_config(None, tree)
        torch.manual_seed(0)
        model = GPT(cfg.model).to(CUDA)
        rt = Runtime(CUDA, torch.bfloat16)
        cfg = resolve_batch(cfg, rt, model)
        micro = cfg.data.batch_size
        assert micro >= 1
        opt = build_optimizer(model, cfg.optimizer, "cuda")
        x = torch.randint(0, 16384, (micro, 1025), device=CUDA)
        torch.cuda.reset_peak_memory_stats(CUDA)
        for _ in range(2):  # the second step holds the optimizer state the first one made
            one_step(model, opt, rt, x)
        peak = torch.cuda.max_memory_allocated(CUDA)
        record_property("auto_micro_batch", micro)
        record_property("auto_peak_fraction_of_cap", round(peak / cap, 3))
        assert peak < cap
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)


def test_memory_estimate_against_max_memory_allocated(tmp_path, record_property):
    """The dry-run estimate (eager, bf16) against the allocator's peak over a step that holds optimizer state:
    stated factor: 0.5 <= measured / estimated <= 1.5."""
    cfg = load_config("gpt2-124m", ["--batch-size", "4", "--global-batch", "0"])
    torch.manual_seed(0)
    model = GPT(cfg.model).to(CUDA)
    rt = Runtime(CUDA, torch.bfloat16)
    opt = build_optimizer(model, cfg.optimizer, "cuda")
    x = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.block_size + 1), device=CUDA)
    one_step(model, opt, rt, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(CUDA)
    one_step(model, opt, rt, x)
    measured = torch.cuda.max_memory_allocated(CUDA)
    estimated = memory_estimate(cfg, model, rt)["total"]
    ratio = measured / estimated
    record_property("memory_measured_gib", round(measured / 2**30, 3))
    record_property("memory_estimated_gib", round(estimated / 2**30, 3))
    record_property("memory_ratio", round(ratio, 3))
    assert 0.5 <= ratio <= 1.5, (measured, estimated)


# ---- resume, host syncs ------------------------------------------------------------------------------------


def test_resume_on_gpu(prepared, tmp_path, record_property):
    """Resume from step 10 of 30 against the uninterrupted run. Bit-identical weights when the GPU's kernels
    are deterministic for this model (checked by training the same run twice); otherwise the losses of steps
    11-30 within 2% of the uninterrupted run's: some backward kernels (FlashAttention's, by default) add with
    atomics in a varying order, so two uninterrupted runs already differ in the last bits, and Adam turns such
    differences in near-zero gradients into visible weight differences; the losses stay close."""
    full, again, cut = tmp_path / "full", tmp_path / "again", tmp_path / "cut"
    cfg = lambda out: load_config(None, gpu_tree(prepared, out, logging={"keep_last": 10}))  # noqa: E731
    run_training(cfg(full), quiet=True)
    run_training(cfg(again), quiet=True)
    cut.mkdir()
    shutil.copytree(full / "step-000010", cut / "step-000010")
    os.symlink("step-000010", cut / "latest")
    assert run_training(cfg(cut), resume=True, quiet=True).step == 30
    a = load_file(str(full / "step-000030" / "model.safetensors"))
    b = load_file(str(resolve_checkpoint(cut) / "model.safetensors"))
    c = load_file(str(again / "step-000030" / "model.safetensors"))
    deterministic = all(torch.equal(a[k], c[k]) for k in a)
    identical = all(torch.equal(a[k], b[k]) for k in a)
    record_property("gpu_runs_deterministic", deterministic)
    record_property("resume_bit_identical", identical)
    if deterministic:
        assert identical
    resumed, uninterrupted = train_losses(cut), train_losses(full)[10:]
    assert len(resumed) == len(uninterrupted) == 20
    worst = max(abs(r - u) / u for r, u in zip(resumed, uninterrupted))
    record_property("resume_worst_loss_rel_diff", worst)
    assert worst < 0.02, (resumed, uninterrupted)


def test_no_host_device_sync_per_training_step(prepared, tmp_path):
    """Synchronising calls (.item(), float(t), device-to-host copies) are counted by CUDA's sync debug mode:
    a run of 6 steps makes no more of them than a run of 3 (logging and evaluation only at the end)."""

    def syncs(steps: int) -> int:
        tree = gpu_tree(prepared, tmp_path / f"s{steps}", schedule={"max_steps": steps, "warmup_steps": 1})
        # no text sample: its length (and so its per-token reads) depends on what the model learnt
        tree["logging"].update(log_interval=1000, eval_interval=1000, eval_iters=1, sample_tokens=0)
        cfg = load_config(None, tree)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_training(cfg, quiet=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(2)  # first use of the GPU in this process: handles, allocator and one-time setup
    assert syncs(6) == syncs(3)


# ---- decode and attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_decode_on_gpu_equals_cpu(family):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(family, block_size=64)).eval()
    with torch.no_grad():  # sharper logits than at init, so no argmax is a near-tie between the two devices
        model.lm_head.weight.mul_(20)
    sc = SamplingConfig(max_tokens=40, temperature=0)
    prompt = [5, 17, 42, 99]
    on_cpu = generate(model, prompt, sc, 512)
    on_gpu = generate(model.to(CUDA), prompt, sc, 512)
    assert len(on_cpu) == 40 and on_gpu == on_cpu


def test_causal_attention_runs_on_the_flash_backend():
    """The plain causal path (no mask, is_causal=True, bf16, head_dim 64) is eligible for FlashAttention:
    restricted to that backend, forward and backward still run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.cuda.get_device_capability(CUDA) < (8, 0):
        pytest.skip("FlashAttention needs compute capability 8.0 or later")
    torch.manual_seed(0)
    model = GPT(tiny_model_config("gpt2", n_embd=128, n_head=2, block_size=128)).to(CUDA)
    x = torch.randint(0, 512, (2, 129), device=CUDA)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
