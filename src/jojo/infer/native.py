"""Attention for a batched decoding step in C, compiled on this machine the first time it is needed.

A batched decode step attends each row's one new query to that row's cached keys and values: rows x heads dot
products and weighted sums over a few hundred positions, which only read memory. PyTorch's CPU
`scaled_dot_product_attention` takes 1.5-1.6 ms for the 6 layers of an 8-row step of the gpt2 6x384 benchmark
model (~160 positions a row) where just reading those keys and values takes 0.8-1.0 ms; the loop below, one pass
over each row's keys and one over its values, takes 1.0 ms. With the stores below, 8 streams decode 16-19% more
tokens/s than through PyTorch's attention (BENCHMARKS.md, session 9).

    out[b, h] = sum_j softmax_j(q[b, h] . k[b, g, j] * scale) v[b, g, j]    for j < lengths[b], g = h // (H / KV)

Each row attends to its own first lengths[b] positions, so no mask is built or read; grouped-query attention
reads a key/value head once per query head that shares it. The same call first writes the step's new keys and
values into the cache (at position lengths[b] - 1 of each row), in place of the twelve `index_copy_` of an 8-row
gpt2 step (~19 us each, every row's new key landing on a cold line) and the copies that made their inputs
contiguous: the step 6% faster.

Built with the system's C compiler (`$CC`, else `cc`): `-O3 -march=native -ffast-math -fopenmp`, into
`~/.cache/jojo/kernels/` (or `$XDG_CACHE_HOME/jojo/kernels/`), named by a hash of the source, the flags and the
CPU, so a home directory shared between different machines gets one build per CPU. `-ffast-math` is given to
the compile step only (at link time it would set flush-to-zero for the whole process); the OpenMP parallel loop
runs on the OpenMP runtime PyTorch has already loaded (the same `libgomp.so.1`), with PyTorch's thread count.
Anything missing (no compiler, no OpenMP, another OS) or a result that disagrees with PyTorch's attention on a
check at load: `decode_attention()` returns None and the engine keeps PyTorch's attention. `JOJO_NATIVE=0` turns
it off. Only the batched engine's steps of several rows use it; a lone row keeps PyTorch's attention, so its
tokens stay those of `generate_stream` bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("jojo.infer.native")

SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Strides in floats. q[b, h, :] at q + b*q_row + h*q_head; the step's new key and value of row b, head g at
   nk + b*nk_row + g*nk_head and nv + b*nv_row + g*nv_head; the cache's k and v[b, g, j, :] at
   k + b*kv_row + g*kv_head + j*D. Row b's new key and value go to position lengths[b] - 1, then its queries attend
   to positions 0 .. lengths[b] - 1 (at most span). out [B, H, D] contiguous. */
void decode_attention(const float *q, int64_t q_row, int64_t q_head, const float *nk, int64_t nk_row,
                      int64_t nk_head, const float *nv, int64_t nv_row, int64_t nv_head, float *k, float *v,
                      int64_t kv_row, int64_t kv_head, const int64_t *lengths, int64_t span, float *out, int B, int H,
                      int KV, int D, float scale, int threads)
{
    int group = H / KV;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int t = 0; t < B * KV; t++) {  /* store the new keys and values (all before any is read) */
            int b = t / KV, g = t % KV;
            int64_t n = lengths[b];
            if (n < 1 || n > span)
                continue;
            memcpy(k + b * kv_row + g * kv_head + (n - 1) * D, nk + b * nk_row + g * nk_head, D * sizeof(float));
            memcpy(v + b * kv_row + g * kv_head + (n - 1) * D, nv + b * nv_row + g * nv_head, D * sizeof(float));
        }
#pragma omp for schedule(static)
        for (int t = 0; t < B * H; t++) {
            int b = t / H, h = t % H;
            int64_t n = lengths[b] < span ? lengths[b] : span;
            const float *qp = q + b * q_row + h * q_head;
            const float *kp = k + b * kv_row + (h / group) * kv_head;
            const float *vp = v + b * kv_row + (h / group) * kv_head;
            float on_stack[2048];
            float *s = n <= 2048 ? on_stack : malloc(n * sizeof(float));
            float *o = out + (int64_t)t * D;
            if (s == NULL || n < 1) {  /* no memory, or nothing to attend to: zeros (never asked for) */
                for (int d = 0; d < D; d++)
                    o[d] = 0.f;
                continue;
            }
            float top = -FLT_MAX;
            for (int64_t j = 0; j < n; j++) {  /* scores, one pass over the keys */
                const float *kj = kp + j * D;
                float dot = 0.f;
                for (int d = 0; d < D; d++)
                    dot += qp[d] * kj[d];
                s[j] = dot * scale;
                top = s[j] > top ? s[j] : top;
            }
            float sum = 0.f;
            for (int64_t j = 0; j < n; j++) {
                s[j] = expf(s[j] - top);
                sum += s[j];
            }
            for (int d = 0; d < D; d++)
                o[d] = 0.f;
            for (int64_t j = 0; j < n; j++) {  /* the weighted sum, one pass over the values */
                const float *vj = vp + j * D;
                float p = s[j];
                for (int d = 0; d < D; d++)
                    o[d] += p * vj[d];
            }
            float inv = 1.f / sum;
            for (int d = 0; d < D; d++)
                o[d] *= inv;
            if (s != on_stack)
                free(s);
        }
    }
}
"""
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
LINK_FLAGS = ["-shared", "-fopenmp"]


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model name and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        import platform

        return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "jojo" / "kernels"


def _build(cc: str) -> Path:
    """Compile SOURCE into a shared library (or reuse an earlier build); raises on failure."""
    key = hashlib.sha256("\0".join([SOURCE, cc, *COMPILE_FLAGS, *LINK_FLAGS, _cpu_key()]).encode()).hexdigest()
    out_dir = _cache_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        out_dir = Path(tempfile.gettempdir()) / "jojo-kernels"
        out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"decode_attention-{key[:16]}.so"
    if lib.exists():
        return lib
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # built aside, then renamed: two builds at once are safe
        src, obj, so = Path(tmp) / "attn.c", Path(tmp) / "attn.o", Path(tmp) / "attn.so"
        src.write_text(SOURCE)
        subprocess.run([cc, *COMPILE_FLAGS, "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
        try:  # glibc's vector expf (libmvec), which -ffast-math lets the loop call; elsewhere plain libm
            subprocess.run([cc, *LINK_FLAGS, str(obj), "-o", str(so), "-lmvec", "-lm"], check=True, capture_output=True)
        except subprocess.CalledProcessError:
            subprocess.run([cc, *LINK_FLAGS, str(obj), "-o", str(so), "-lm"], check=True, capture_output=True)
        os.replace(so, lib)
    return lib


def _agrees_with_sdpa(attend) -> bool:
    """A small case with grouped heads, strided views and rows of different lengths, against PyTorch (the new
    keys and values stored first, at each row's last position)."""
    g = torch.Generator().manual_seed(0)
    B, H, KV, D, span = 3, 4, 2, 16, 9
    kc, vc = (torch.randn(B, KV, 12, D, generator=g) for _ in range(2))
    qkv = torch.randn(B, 1, H + 2 * KV, D, generator=g).transpose(1, 2)  # views, as the step makes them
    q, k_new, v_new = qkv.split([H, KV, KV], dim=1)
    lengths = torch.tensor([5, 1, 9])
    k, v = kc[:, :, :span], vc[:, :, :span]
    k_ref, v_ref = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        k_ref[b, :, n - 1], v_ref[b, :, n - 1] = k_new[b, :, 0], v_new[b, :, 0]
    mask = (torch.arange(span).view(1, span) < lengths.view(B, 1)).view(B, 1, 1, span)
    ref = F.scaled_dot_product_attention(q, k_ref, v_ref, attn_mask=mask, enable_gqa=True)
    out = attend(q, k_new, v_new, k, v, lengths)
    return torch.allclose(out, ref.transpose(1, 2).reshape(B, 1, -1), rtol=1e-4, atol=1e-5) and all(
        torch.equal(k[b, :, :n], k_ref[b, :, :n]) and torch.equal(v[b, :, :n], v_ref[b, :, :n])
        for b, n in enumerate(lengths.tolist())
    )


@functools.lru_cache(maxsize=1)
def decode_attention() -> Callable[..., torch.Tensor] | None:
    """attend(q, k_new, v_new, k, v, lengths) -> [B, 1, H * D], or None where the kernel cannot be built or used
    (see the module docstring). q: [B, H, 1, D]; k_new, v_new: [B, KV, 1, D], the step's new keys and values,
    written into k, v ([B, KV, S, D] views of a cache, positions contiguous, D floats each) at position
    lengths[b] - 1 of row b before row b attends to its first lengths[b] positions (at most S). float32 on CPU."""
    if os.environ.get("JOJO_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found: batched decoding uses PyTorch's attention")
        return None
    try:
        lib = _build(cc)
        try:
            fn = ctypes.CDLL(str(lib)).decode_attention
        except OSError:  # a damaged file from an earlier build: build it again, once
            lib.unlink(missing_ok=True)
            fn = ctypes.CDLL(str(_build(cc))).decode_attention
    except (OSError, subprocess.CalledProcessError) as exc:
        said = (getattr(exc, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()
        said = [ln for ln in said if "error" in ln] or said  # a compiler's first error, not its caret line
        reason = said[0] if said else (f"exit status {exc.returncode}" if hasattr(exc, "returncode") else str(exc))
        log.warning(
            "could not build the decode attention kernel with %s (%s): batched decoding uses PyTorch's attention "
            "(8 rows: ~15%% fewer tokens/s; JOJO_NATIVE=0 skips the build)",
            cc,
            reason,
        )
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn.restype = None
    fn.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, ptr]
    fn.argtypes += [i32, i32, i32, i32, ctypes.c_float, i32]

    def attend(q, k_new, v_new, k, v, lengths: torch.Tensor) -> torch.Tensor:
        B, H, _, D = q.shape
        KV, span = k.shape[1], k.shape[2]
        tensors = (q, k_new, v_new, k, v)
        if not (
            all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)
            and k_new.shape == v_new.shape == (B, KV, 1, D)
            and k.shape == v.shape == (B, KV, span, D)
            and k.stride() == v.stride()
            and k.stride(2) == D
            and KV >= 1
            and H % KV == 0
            and lengths.dtype == torch.int64
            and lengths.device.type == "cpu"
            and lengths.is_contiguous()
            and lengths.shape == (B,)
        ):
            raise ValueError(
                "decode_attention: CPU float32 q [B, H, 1, D], k_new/v_new [B, KV, 1, D], k/v [B, KV, S, D] in rows "
                "of D, int64 lengths [B]"
            )
        out = q.new_empty(B, 1, H * D)
        fn(q.data_ptr(), q.stride(0), q.stride(1), k_new.data_ptr(), k_new.stride(0), k_new.stride(1),
           v_new.data_ptr(), v_new.stride(0), v_new.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
           lengths.data_ptr(), span, out.data_ptr(), B, H, KV, D, D**-0.5, torch.get_num_threads())  # fmt: skip
        return out

    if not _agrees_with_sdpa(attend):
        log.warning("the decode attention kernel disagrees with PyTorch's attention on this machine: not used")
        return None
    return attend
