"""Device and precision policy, low in the layers so inference, evaluation and training share it.

`pick_device("auto")` chooses the CUDA GPU with the most free memory, else Apple's MPS, else the CPU;
`pick_dtype` resolves `--dtype auto` (bf16 where the device has native bf16 math); `autocast(device, dtype)` is a
no-op context in float32.
"""

from __future__ import annotations

import contextlib
import os

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


def cpu_native_bf16() -> bool:
    """Does this CPU multiply bfloat16 natively (x86 AVX-512 BF16 or AMX tiles)?

    There oneDNN runs bf16 matmuls on the bf16 units, and a small model's training step under bf16 autocast is
    ~1.5x faster than in float32 (BENCHMARKS.md); elsewhere bf16 is converted in software and slower."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def native_bf16(device: torch.device) -> bool:
    """Does this device do bfloat16 math natively: a CUDA GPU with bf16 tensor cores (Ampere, compute
    capability 8.0, and later), or a CPU with bf16 units (`cpu_native_bf16`)?

    Not `torch.cuda.is_bf16_supported()` alone: by default it also says yes where bf16 is only emulated
    (V100, T4), where bf16 matmuls run far below float16's tensor-core rate."""
    if device.type == "cpu":
        return cpu_native_bf16()
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8 and torch.cuda.is_bf16_supported()


def pick_dtype(requested: str, device: torch.device, training: bool = False) -> torch.dtype:
    """`auto`: bfloat16 autocast where the device has native bf16 math, else float32. On a CPU only for
    training: evaluation and generation there stay float32 (bound by memory or per-call overhead, where bf16
    gains little, and their figures then match other tools' float32 ones)."""
    if requested == "auto":
        if device.type == "cpu" and not training:
            return torch.float32
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


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can use on `device` now, or None when unknown (MPS, or no way to ask).

    CUDA: free device memory (`mem_get_info`) plus what this process's caching allocator already holds.
    CPU: /proc/meminfo's MemAvailable (free plus reclaimable page cache), capped by the cgroup's memory limit in
    a container (/proc/meminfo shows the host's); elsewhere sysconf's available pages."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for folder, limit_name, usage_name, cache_name in (
        ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),  # cgroup v2
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),  # v1
    ):
        try:
            with open(f"{folder}/{limit_name}") as fh:
                limit = fh.read().strip()
            with open(f"{folder}/{usage_name}") as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            # the usage counts page cache; its inactive part is reclaimed before the limit bites
            usage -= _stat_field(f"{folder}/memory.stat", cache_name)
            available = min(available, max(int(limit) - usage, 0))
        break
    return available


def _stat_field(path: str, name: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0
