"""Device, precision and process-group policy, applied to the model from outside.

`Runtime` answers: which device, which autocast dtype, am I one of several processes (torchrun), and am I
the one that logs and saves. `wrap_for_training` applies compile and DDP to a plain `GPT`.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from jojo.config import SystemConfig
from jojo.errors import JojoError

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


def pick_device(requested: str) -> torch.device:
    """auto -> the CUDA GPU with the most free memory, else MPS, else CPU."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise JojoError(f"device '{requested}' requested but CUDA is not available; use --device cpu")
        if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise JojoError("device 'mps' requested but MPS is not available; use --device cpu")
        return torch.device(requested)
    if torch.cuda.is_available():
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        return torch.device(f"cuda:{int(np.argmax(free))}")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtype = getattr(torch, requested)
    if dtype == torch.float16 and device.type == "cpu":
        raise JojoError("float16 autocast is not supported on CPU; use --dtype bfloat16 or float32")
    return dtype


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


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
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, pick_dtype(cfg.dtype, device), rank, local_rank, world_size)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_for_training(model: torch.nn.Module, rt: Runtime, compile_model: bool) -> torch.nn.Module:
    """compile and DDP from outside the model file; returns the module to call in the loop."""
    if compile_model:
        model = torch.compile(model)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model
