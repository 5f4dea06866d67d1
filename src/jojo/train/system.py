"""Device, precision and process-group policy, applied to the model from outside.

`Runtime` answers: which device, which autocast dtype, am I one of several processes (torchrun), and am I
the one that logs and saves. `wrap_for_training` applies compile and DDP (or FSDP2) to a plain `GPT`.
`fit_micro_batch` finds the largest micro-batch that fits in GPU memory (`--batch-size auto`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from jojo.config import ModelConfig, SystemConfig
from jojo.device import autocast, pick_device, pick_dtype

# Dense (no 2:4 sparsity) peak FLOP/s per GPU model, for MFU: (bfloat16, float16, float32) matmul peaks.
#   - 16-bit figures are tensor-core rates with FP32 accumulation (what PyTorch's matmuls use). NVIDIA quotes
#     data-centre parts with sparsity; these are half of those. GeForce cards run FP32-accumulate tensor math at
#     half their FP16-accumulate rate; the figures are the FP32-accumulate ones.
#   - float32 is the TF32 tensor-core rate on Ampere and later (Jojo enables TF32, `system.tf32`); with TF32
#     off, MFU is not reported there. Volta and Turing have no TF32 and no bf16 tensor cores: their float32
#     figure is the plain FP32 rate and their bf16 entry is None (bf16 there is emulated).
# Sources: the NVIDIA datasheets (H100, H200, GH200, A100, A10, L4, L40, L40S, V100, T4) and the Ampere GA102 /
# Ada architecture whitepapers (RTX 3070/3080/3090, 4080/4090). RTX 3060, 4060, 4060 Ti, 4070 and 4070 Ti are
# not in the whitepapers: SMs x boost clock x 512 FP16 FLOP per SM per clock with FP32 accumulation (the rate
# that reproduces the whitepapers' GeForce figures). A10G: AWS publishes no tensor figure; it is the A10's.
PEAK_FLOPS: dict[str, tuple[float | None, float, float]] = {
    "h100 sxm": (989.4e12, 989.4e12, 494.7e12),
    "h100 pcie": (756.5e12, 756.5e12, 378e12),
    "h100 nvl": (835.5e12, 835.5e12, 417.5e12),
    "h200": (989.4e12, 989.4e12, 494.7e12),
    "h200 nvl": (835.5e12, 835.5e12, 417.5e12),
    "gh200": (989.4e12, 989.4e12, 494.7e12),
    "a100": (312e12, 312e12, 156e12),  # 40 and 80 GB, SXM and PCIe alike
    "a10": (125e12, 125e12, 62.5e12),
    "a10g": (125e12, 125e12, 62.5e12),
    "l4": (121e12, 121e12, 60e12),
    "l40": (181e12, 181e12, 90.5e12),
    "l40s": (362e12, 362e12, 183e12),
    "rtx 3060": (25.5e12, 25.5e12, 12.7e12),
    "rtx 3070": (40.6e12, 40.6e12, 20.3e12),
    "rtx 3080": (59.5e12, 59.5e12, 29.8e12),
    "rtx 3090": (71e12, 71e12, 35.6e12),
    "rtx 4060": (30.2e12, 30.2e12, 15.1e12),
    "rtx 4060 ti": (44.1e12, 44.1e12, 22.1e12),
    "rtx 4070": (58.3e12, 58.3e12, 29.1e12),
    "rtx 4070 ti": (80.2e12, 80.2e12, 40.1e12),
    "rtx 4080": (97.5e12, 97.5e12, 48.7e12),
    "rtx 4090": (165.2e12, 165.2e12, 82.6e12),
    "v100 sxm2": (None, 125e12, 15.7e12),
    "v100 pcie": (None, 112e12, 14e12),
    "v100s": (None, 130e12, 16.4e12),
    "t4": (None, 65e12, 8.1e12),
}

# (pattern on the normalised device name, PEAK_FLOPS key), most specific first. Variants with other clocks or
# SM counts (laptop parts, MIG slices, RTX 4090 D, Ti/Super models not listed, V100 SXM3) match nothing, so
# MFU is left out rather than computed against the wrong peak.
_GPU_PATTERNS = [
    (r"\bgh200\b", "gh200"),
    (r"\bh200\b.*\bnvl\b", "h200 nvl"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b.*\bnvl\b", "h100 nvl"),
    (r"\bh100\b.*\bpcie\b", "h100 pcie"),
    (r"\bh100\b", "h100 sxm"),  # the SXM part reports itself as "NVIDIA H100 80GB HBM3"
    (r"\ba100\b", "a100"),
    (r"\ba10g\b", "a10g"),
    (r"\ba10\b", "a10"),
    (r"\bl40s\b", "l40s"),
    (r"\bl40\b", "l40"),
    (r"\bl4\b", "l4"),
    (r"\bv100s\b", "v100s"),
    (r"\bv100\b.*\bpcie\b", "v100 pcie"),
    (r"\bv100\b.*\bsxm2\b", "v100 sxm2"),
    (r"\bt4\b", "t4"),
]


def gpu_model(name: str) -> str | None:
    """The PEAK_FLOPS key of a CUDA device name (`torch.cuda.get_device_name`), or None when not listed.

    "NVIDIA H100 80GB HBM3" -> "h100 sxm"; "Tesla V100-SXM2-16GB" -> "v100 sxm2"; "NVIDIA GeForce RTX 4060 Ti"
    -> "rtx 4060 ti"; "NVIDIA GeForce RTX 3080 Laptop GPU" -> None."""
    n = " ".join(re.sub(r"[-_/()]", " ", name.lower()).split())
    words = set(n.split())
    if words & {"laptop", "mobile", "mig"} or "max q" in n:
        return None
    geforce = re.search(r"\brtx (\d{4})((?: ti)?(?: super)?(?: d)?)\b", n)
    if geforce:  # the whole model name, suffixes included: a "3080 ti" is not a "3080"
        key = f"rtx {geforce.group(1)}{geforce.group(2)}"
        return key if key in PEAK_FLOPS else None
    for pattern, key in _GPU_PATTERNS:
        if re.search(pattern, n):
            return key
    return None


def peak_flops_of(name: str, dtype: torch.dtype, tf32: bool = True) -> float | None:
    """Dense peak FLOP/s of the GPU called `name` for matmuls in `dtype` (None: unknown GPU or no such rate)."""
    key = gpu_model(name)
    if key is None:
        return None
    bf16, fp16, fp32 = PEAK_FLOPS[key]
    if dtype == torch.bfloat16:
        return bf16
    if dtype == torch.float16:
        return fp16
    if dtype == torch.float32:
        pre_ampere = bf16 is None  # no TF32 there: float32 runs at the FP32 rate whatever the flag says
        return fp32 if tf32 or pre_ampere else None
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak for MFU of this process's GPU (None on CPU/MPS and on GPUs missing from PEAK_FLOPS)."""
    if device.type != "cuda":
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest"  # what `system.tf32` set in setup_runtime
    return peak_flops_of(torch.cuda.get_device_name(device), dtype, tf32)


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    fsdp: bool = False  # parameters are sharded (FSDP2) rather than replicated (DDP)
    eval_dtype: torch.dtype | None = None  # validation's autocast dtype; None: the training dtype

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        return autocast(self.device, self.dtype)

    @property
    def validation_dtype(self) -> torch.dtype:
        return self.eval_dtype or self.dtype

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """float16 needs loss scaling (its exponent range underflows small gradients); bfloat16 does not."""
        if self.dtype == torch.float16 and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def setup_runtime(cfg: SystemConfig) -> Runtime:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        import torch.distributed as dist

        if cfg.device == "auto" and torch.cuda.is_available() or cfg.device.startswith("cuda"):
            device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    else:
        device = pick_device(cfg.device)
    if device.type == "cuda":
        # TF32: float32 matmuls on tensor cores (10-bit mantissa inputs, float32 accumulation), ~2x faster on
        # Ampere and later; training quality is unaffected in practice (PyTorch and nanoGPT default to it).
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.fsdp and world_size == 1:
        print("note: --system.fsdp applies under torchrun with several processes; training unsharded")
    # validation in what `jojo eval` picks for the same --dtype, so the two report the same figure
    return Runtime(
        device,
        pick_dtype(cfg.dtype, device, training=True),
        rank,
        local_rank,
        world_size,
        cfg.fsdp and world_size > 1,
        eval_dtype=pick_dtype(cfg.dtype, device),
    )


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# `system.compile` auto: compile a CPU bf16 run planned for at least this many steps or seconds. Measured on a
# 2-core AVX-512 BF16 CPU (BENCHMARKS.md): compiling takes ~20 s cold (~3 s from inductor's cache) and makes a
# bf16 step ~1.15-1.35x faster, so it pays for itself after about two minutes; in float32 it gains nothing there.
COMPILE_MIN_STEPS = 300
COMPILE_MIN_SECONDS = 120.0


def resolve_compile(requested: bool | None, rt: Runtime, steps: int, max_seconds: float = 0.0) -> bool:
    """`system.compile`: true/false as asked; auto (None) compiles where it was measured to pay for itself: a
    run on a CPU in bf16 autocast, long enough (COMPILE_MIN_*), with a C++ compiler for inductor to call."""
    if requested is not None:
        return requested
    if rt.device.type != "cpu" or rt.dtype != torch.bfloat16:
        return False
    if max_seconds:
        long_enough = max_seconds >= COMPILE_MIN_SECONDS
    else:
        long_enough = steps >= COMPILE_MIN_STEPS
    compiler = os.environ.get("CXX") or "g++"
    return long_enough and shutil.which(compiler) is not None


def wrap_for_training(model: torch.nn.Module, rt: Runtime, compile_model: bool) -> torch.nn.Module:
    """compile and DDP/FSDP2 from outside the model file; returns the module to call in the loop.

    FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each transformer block, then the root (embeddings,
    final norm, head): a block's full weights exist only while it runs. It changes `model` in place (its
    parameters become DTensors), so build the optimizer after this call. Works with NCCL and with gloo on CPU.
    """
    if rt.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return torch.compile(model) if compile_model else model
    if compile_model:
        model = torch.compile(model)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


def fit_micro_batch(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] with fits(n), assuming fits is monotone (true up to some size, then false).

    Doubles from 1 until a size fails or reaches `limit`, then bisects between the last success and the first
    failure: O(log limit) trials, each a forward+backward on the GPU. Returns 0 when even 1 does not fit."""
    if limit < 1 or not fits(1):
        return 0
    good, n = 1, 2
    while n <= limit and fits(n):
        good, n = n, n * 2
    bad = min(n, limit + 1)  # the first size known (or assumed, past the limit) not to fit
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def cuda_fits(
    model: torch.nn.Module, rt: Runtime, block_size: int, vocab_size: int, reserve_bytes: int = 0
) -> Callable[[int], bool]:
    """fits(n): does a forward+backward of n rows fit on the GPU while `reserve_bytes` stay allocated?

    The trial runs the plain (uncompiled) model with no gradients or optimizer state yet: the reserve stands in
    for what a real step holds on top (see `probe_reserve`), so the size found does not run out of memory at the
    first optimizer step."""

    def fits(n: int) -> bool:
        ballast = x = loss = None
        try:
            if reserve_bytes > 0:
                ballast = torch.empty(reserve_bytes, dtype=torch.uint8, device=rt.device)
            x = torch.randint(0, vocab_size, (n, block_size), device=rt.device)
            with rt.autocast():
                _, loss = model(x, x)
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del ballast, x, loss
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits


PROBE_HEADROOM = 0.05  # of the GPU's memory: allocator fragmentation and the compiled graph's own buffer plan


def optimizer_state_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """Bytes of optimizer state: AdamW 8 P (exp_avg, exp_avg_sq in float32); Muon 4 per parameter of the hidden
    matrices (one momentum buffer) and AdamW's 8 for the rest (embeddings, head, norms, biases)."""
    params = {id(p): p for p in model.parameters()}.values()  # a tied weight once
    total = sum(p.numel() for p in params)
    if optimizer != "muon":
        return 8 * total
    hidden = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks."))
    return 4 * hidden + 8 * (total - hidden)


def probe_reserve(model: torch.nn.Module, rt: Runtime, optimizer: str, total_memory: int) -> int:
    """What a training step holds beyond a bare forward+backward, for `cuda_fits`: optimizer state
    (`optimizer_state_bytes`) + 4 P (gradients kept across accumulation micro-steps) + 4 P under DDP (its gradient
    buckets) + PROBE_HEADROOM x the GPU's memory."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    ddp = 4 * n if rt.distributed and not rt.fsdp else 0
    return optimizer_state_bytes(model, optimizer) + 4 * n + ddp + int(PROBE_HEADROOM * total_memory)


def activation_bytes(c: ModelConfig, rows: int, dtype: torch.dtype) -> float:
    """Bytes held for the backward pass of an eager forward over `rows` rows of c.block_size tokens, at the
    loss's backward (the peak): e = bytes per element of the autocast dtype (2 for bf16/fp16, 4 in float32),
    C = n_embd, C_kv = n_kv_head * head_dim, H = mlp_hidden, V = vocab_size, per token:

        per layer:  8 C                       the two norms' inputs: the residual stream stays float32 under
                                              autocast (llama's RMSNorm also keeps its float32 output: +8 C)
                    + e (C + C + 2 C_kv)      the attention input as the matmul reads it; q, k, v
                    + e (C + C_kv)            llama only: the rotated q and k
                    + e (3 C)                 SDPA's output, the output projection's input, the MLP's input
                    + e 2 H  (gelu)           fc output and GELU output; SwiGLU: gate, up, silu(gate), product
                      | e 4 H  (swiglu)
        logits:     12 V                      float32 log-softmax output kept for backward, then its gradient
                                              and the logits' gradient alive at once

    SDPA's flash/memory-efficient kernels keep no T x T scores. Under 16-bit autocast, add the weights' 16-bit
    copies autocast caches for the step (2 bytes per matmul weight, not counted here). Measured against the
    tensors autograd saves on CPU (tests/test_gpu_paths.py): the per-layer terms agree within ~10%. Compiled
    graphs usually hold less (recomputed pointwise ops)."""
    e = 4 if dtype == torch.float32 else 2
    C, H, V = c.n_embd, c.mlp_hidden, c.vocab_size
    ckv = c.n_kv_head * c.head_dim
    llama = c.family == "llama"
    layer = 8 * C + (8 * C if llama else 0)
    layer += e * (2 * C + 2 * ckv) + (e * (C + ckv) if llama else 0) + e * 3 * C
    layer += e * (4 * H if llama else 2 * H)
    tokens = rows * c.block_size
    return tokens * (c.n_layer * layer + 12 * V)


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device`. To a GPU through page-locked (pinned) memory with non_blocking copies: a
    copy from ordinary pageable memory is staged by the driver synchronously, which makes the host wait and
    stops it from queueing the next kernels while the GPU still works on the previous ones."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in pinned.items()}


def plan_batch(micro: int, global_rows: int, world_size: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) whose product times world_size is exactly global_rows, with the largest
    micro-batch <= micro that divides the rows each rank needs."""
    per_rank = max(global_rows // world_size, 1)
    micro = max(min(micro, per_rank), 1)
    while per_rank % micro:
        micro -= 1
    return micro, per_rank // micro
