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


def autocast(device: torch.device, dtype: torch.dtype):
    """torch.autocast for a lower-precision dtype, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
