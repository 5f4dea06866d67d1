"""Device, precision and process-group policy, applied to the model from outside.

`Runtime` answers: which device, which autocast dtype, am I one of several processes (torchrun), and am I
the one that logs and saves. `wrap_for_training` applies compile and DDP (or FSDP2) to a plain `GPT`.
`fit_micro_batch` finds the largest micro-batch that fits in GPU memory (`--batch-size auto`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from jojo.config import SystemConfig
from jojo.device import autocast, pick_device, pick_dtype

# Dense bf16 peak FLOP/s by GPU name fragment (vendor datasheets, without sparsity), for MFU.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops if dtype in (torch.bfloat16, torch.float16) else flops / 2  # TF32 ~ half of bf16
    return None


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    fsdp: bool = False  # parameters are sharded (FSDP2) rather than replicated (DDP)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        return autocast(self.device, self.dtype)

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
    return Runtime(device, pick_dtype(cfg.dtype, device), rank, local_rank, world_size, cfg.fsdp and world_size > 1)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def cuda_fits(model: torch.nn.Module, rt: Runtime, block_size: int, vocab_size: int) -> Callable[[int], bool]:
    """fits(n): does a forward+backward of n rows (with a margin for the optimizer state) fit on the GPU?"""

    def fits(n: int) -> bool:
        try:
            x = torch.randint(0, vocab_size, (n, block_size), device=rt.device)
            with rt.autocast():
                _, loss = model(x, x)
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits


def plan_batch(micro: int, global_rows: int, world_size: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) whose product times world_size is exactly global_rows, with the largest
    micro-batch <= micro that divides the rows each rank needs."""
    per_rank = max(global_rows // world_size, 1)
    micro = max(min(micro, per_rank), 1)
    while per_rank % micro:
        micro -= 1
    return micro, per_rank // micro
