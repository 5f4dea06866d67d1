"""Device and precision policy, low in the layers so inference, evaluation and training share it.

`pick_device("auto")` chooses the CUDA GPU with the most free memory, else Apple's MPS, else the CPU;
`pick_dtype` resolves `--dtype auto`; `autocast(device, dtype)` is a no-op context in float32.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from jojo.errors import JojoError


def pick_device(requested: str) -> torch.device:
    """auto -> the CUDA GPU with the most free memory, else MPS, else CPU."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise JojoError(f"device '{requested}' requested but CUDA is not available; use --device cpu")
        if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise JojoError("device 'mps' requested but MPS is not available; use --device cpu")
        return torch.device(requested)
    if torch.cuda.is_available():
        if torch.cuda.device_count() == 1:
            return torch.device("cuda:0")
        # mem_get_info opens a CUDA context (a few hundred MB) on every GPU it asks, for the process's lifetime:
        # only worth it when there is a choice to make.
        free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
        return torch.device(f"cuda:{int(np.argmax(free))}")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Does this CUDA GPU have bfloat16 tensor cores (Ampere, compute capability 8.0, and later)?

    Not `torch.cuda.is_bf16_supported()` alone: by default it also says yes where bf16 is only emulated
    (V100, T4), where bf16 matmuls run far below float16's tensor-core rate."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8 and torch.cuda.is_bf16_supported()


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    dtype = getattr(torch, requested)
    if dtype == torch.float16 and device.type == "cpu":
        raise JojoError("float16 autocast is not supported on CPU; use --dtype bfloat16 or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """torch.autocast for a lower-precision dtype, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
