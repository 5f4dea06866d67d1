"""Fast one-row decoding on CPU: a conversion applied to a model loaded for inference, never to the architecture.

Decoding one token multiplies a single row by every weight matrix: a memory-bound matrix-vector product whose
speed depends on the kernel and the CPU far more than on anything else. Three ways of computing y = x W^T for
one row x, each best somewhere:

- ``linear``: `F.linear(x, W)` on the weight as stored, [out, in] (MKL/oneDNN's GEMV);
- ``matmul``: `x @ Wt` with the weight pre-transposed to a contiguous [in, out] (a plain row-major GEMV: 31.9 µs
  against F.linear's 48.9 µs for a 384x1536 layer on an Intel Xeon VM with AMX);
- ``bag``: the same product as a weighted sum of the rows of Wt, `embedding_bag(mode="sum",
  per_sample_weights=x)`, FBGEMM's kernel, with the rows cut into one bag per thread and the partial sums added
  (0.9 ms for a 12M-parameter gpt2's 25 products per token on the AMD EPYC VM of BENCHMARKS.md, against 3.1 ms
  with F.linear: 3x; but slower than F.linear on that Xeon).

So `convert_for_decoding(model)` times the candidates once per weight shape, on all of the model's weights of
that shape in turn and after reading the rest of the model (as cold as decoding finds them: timed on a weight
just used, F.linear won some shapes that it lost in the model), with this machine's threads, and gives each
linear layer the winner for its shape. A converted layer keeps its
parameter names and values: when the winner needs the transposed layout, the weight becomes a view of the
transposed copy (one storage, so memory is not doubled, and an in-place change of the weight is seen by both).
SwiGLU's gate and up read the same input: they are laid side by side in one copy, one product for both.

`DecodeStep(model)` runs `GPT.forward` for one new token per row without the module machinery: for one row the
same operations on the same tensors in the same order (the same logits, bit for bit; the tests compare them),
minus the per-call bookkeeping of ~60 module calls and the forward's checks for other shapes (~0.4 ms of a 3 ms
step for a 14M-parameter model on CPU). For several rows with oneDNN-packed weights it also fuses GPT-2's GELU
into the product before it (the same to float rounding).

A converted model is for inference only (its parameters no longer require gradients). The conversion applies to
float32 models on CPU; on other devices or dtypes it returns the model unchanged. Several rows at once (a prompt,
a batched decoding step) take `F.linear` on the same storage, or oneDNN on a packed copy once
`jojo.infer.batch.convert_for_batches` has run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from jojo.model import GPT, GeluMLP, SwiGLU

KERNELS = ("linear", "matmul", "bag")
_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines  # x86 builds: FBGEMM's embedding-bag kernels
_BAG_LAYOUTS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _bag_layout(n_rows: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices 0..n_rows-1 cut into `parts` bags of consecutive rows (the bag offsets), made once per shape."""
    key = (n_rows, parts)
    if key not in _BAG_LAYOUTS:
        offsets = torch.tensor([k * n_rows // parts for k in range(parts)])
        _BAG_LAYOUTS[key] = (torch.arange(n_rows), offsets)
    return _BAG_LAYOUTS[key]


def one_row(wt: torch.Tensor, x: torch.Tensor, kernel: str) -> torch.Tensor:
    """x (numel == in) @ wt ([in, out], contiguous) -> [out], by the `matmul` or `bag` kernel."""
    if kernel == "matmul":
        return x.reshape(1, -1).mm(wt)[0]
    parts = min(torch.get_num_threads(), wt.shape[0])
    indices, offsets = _bag_layout(wt.shape[0], parts)
    # torch.embedding_bag is the op F.embedding_bag calls after its argument checks (which cost 3x the op itself
    # at this size): weight, indices, offsets, scale_grad_by_freq, mode 0 = sum, sparse, per_sample_weights,
    # include_last_offset, padding_idx. It returns (sums, and three bookkeeping tensors).
    y = torch.embedding_bag(wt, indices, offsets, False, 0, False, x.reshape(-1), False, None)[0]
    return y.sum(0) if parts > 1 else y[0]


def row_product(x: torch.Tensor, wt: torch.Tensor, kernel: str, bias: torch.Tensor | None, shape) -> torch.Tensor:
    """One row's x @ wt (+ bias) by a one-row kernel, viewed as `shape`."""
    y = one_row(wt, x, kernel)
    return (y if bias is None else y.add_(bias)).view(shape)


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose one-row product runs the kernel chosen for its shape. With `matmul` or `bag` the
    weight parameter is a view of `wt`, the contiguous transposed copy [in, out], so both always agree."""

    kernel: str = "linear"
    wt: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wt is not None and x.numel() == x.shape[-1]:
            return row_product(x, self.wt, self.kernel, self.bias, (*x.shape[:-1], self.out_features))
        return F.linear(x, self.weight, self.bias)


class DecodeSwiGLU(nn.Module):
    """SwiGLU with gate and up as one [in, 2 * hidden] product (views keep `gate.weight` and `up.weight`)."""

    def __init__(self, mlp: SwiGLU, kernel: str):
        super().__init__()
        self.gate, self.up, self.proj = mlp.gate, mlp.up, mlp.proj
        self.kernel = kernel
        hidden = mlp.gate.out_features
        with torch.no_grad():
            self.wt = torch.cat([mlp.gate.weight.t(), mlp.up.weight.t()], dim=1).contiguous()
            self.gate.weight = nn.Parameter(self.wt[:, :hidden].t(), requires_grad=False)
            self.up.weight = nn.Parameter(self.wt[:, hidden:].t(), requires_grad=False)
        biases = (mlp.gate.bias, mlp.up.bias)
        self.bias = torch.cat(biases) if all(b is not None for b in biases) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and self.kernel != "linear":
            both = one_row(self.wt, x, self.kernel)
        else:
            both = x @ self.wt
        if self.bias is not None:
            both = both + self.bias
        gate, up = both.view(*x.shape[:-1], 2, -1).unbind(-2)
        return self.proj(F.silu(gate) * up)


def time_turns(
    runs: dict[str, Callable[[], object]], reps: int = 9, before: Callable[[], None] | None = None
) -> dict[str, float]:
    """The median wall time of each run, the runs taking turns: each of `reps` rounds times every run once (after
    `before()` when given), after one untimed round. Taking turns, a burst of other work on the machine slows
    every candidate alike instead of the one being timed at that moment (timed one after the other, a busy
    machine made oneDNN lose shapes it wins by 2x)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[reps // 2] for k, v in times.items()}


def pick_kernel(
    weight: torch.Tensor,
    candidates: tuple[str, ...] = KERNELS,
    others: tuple[torch.Tensor, ...] = (),
    evict: Callable[[], None] | None = None,
) -> tuple[str, dict[str, float]]:
    """The fastest one-row kernel for weights of this shape on this machine, and each candidate's median time.

    Timed on `weight` and `others` (of the same shape) in turn, as a model's layers use them; with `evict`, each
    timing comes after it (`convert_for_decoding` reads the rest of the model there, so the weights come from
    where decoding finds them: memory, for a model larger than the CPU's caches, where the kernels rank
    differently than on a weight just used: F.linear's GEMV won some shapes warm and lost them all cold on the
    AMD EPYC VM of BENCHMARKS.md)."""
    weights = [weight.detach(), *(w.detach() for w in others)]
    x = torch.randn(1, weight.shape[1])
    transposed = [w.t().contiguous() for w in weights]
    run = {
        "linear": lambda: [F.linear(x, w) for w in weights],
        "matmul": lambda: [one_row(wt, x, "matmul") for wt in transposed],
        "bag": lambda: [one_row(wt, x, "bag") for wt in transposed],
    }
    usable = {k: run[k] for k in candidates if k != "bag" or _FBGEMM}
    with torch.inference_mode():
        times = time_turns(usable, reps=9 if evict else 21, before=evict)
    return min(times, key=times.get), times


def evictor(model: GPT, budget: int = 64 << 20) -> Callable[[], None]:
    """A function that reads the model's parameters, up to `budget` bytes (more than a CPU's last-level cache):
    what decoding a token does between two uses of the same layer."""
    params, total = [], 0
    for p in model.parameters():
        if total >= budget:
            break
        params.append(p)
        total += p.numel() * p.element_size()

    def evict() -> None:
        with torch.inference_mode():
            for p in params:
                p.sum()

    return evict


def _decode_weights(model: GPT) -> dict[tuple[int, int], list[torch.Tensor]]:
    """The weights `convert_for_decoding` converts, by shape: every linear layer's, except SwiGLU's gate and up,
    which become one [2 * hidden, in] matrix per block."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    fused = set()
    for block in model.blocks:
        if isinstance(block.mlp, SwiGLU):
            both = torch.cat([block.mlp.gate.weight, block.mlp.up.weight]).detach()
            groups.setdefault(tuple(both.shape), []).append(both)
            fused |= {id(block.mlp.gate), id(block.mlp.up)}
    for module in model.modules():
        if type(module) is nn.Linear and id(module) not in fused:
            groups.setdefault(tuple(module.weight.shape), []).append(module.weight.detach())
    return groups


def _convert_linear(layer: nn.Linear, kernel: str) -> DecodeLinear:
    new = DecodeLinear.__new__(DecodeLinear)
    nn.Module.__init__(new)
    new.in_features, new.out_features = layer.in_features, layer.out_features
    new.kernel = kernel
    with torch.no_grad():
        if kernel == "linear":
            new.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
        else:
            new.wt = layer.weight.detach().t().contiguous()
            new.weight = nn.Parameter(new.wt.t(), requires_grad=False)
    new.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
    return new


def convert_for_decoding(model: GPT, kernel: str = "auto") -> GPT:
    """Convert `model` in place for fast one-row decoding on CPU (see the module docstring); returns it.

    kernel: "auto" times the candidates per weight shape; or force one of KERNELS for every layer. Models on other
    devices or dtypes, and models already converted, are returned unchanged."""
    p = model.wte.weight
    if p.device.type != "cpu" or p.dtype != torch.float32 or getattr(model, "decode_kernels", None) is not None:
        return model
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"unknown decode kernel {kernel!r}; choose auto or one of {', '.join(KERNELS)}")
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    groups = _decode_weights(model)
    if kernel == "auto":  # timed on all the weights of each shape, as cold as decoding finds them
        evict = evictor(model)
        chosen = {shape: pick_kernel(ws[0], others=tuple(ws[1:]), evict=evict)[0] for shape, ws in groups.items()}
    else:
        chosen = dict.fromkeys(groups, kernel)

    def choose(weight: torch.Tensor) -> str:
        return chosen[tuple(weight.shape)]

    tied = model.config.tie_embeddings
    for block in model.blocks:
        if isinstance(block.mlp, SwiGLU):
            gate = block.mlp.gate  # gate and up side by side: [2 * hidden, in], the shape _decode_weights timed
            block.mlp = DecodeSwiGLU(block.mlp, chosen[(2 * gate.out_features, gate.in_features)])
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(module, DecodeSwiGLU) and child_name in ("gate", "up"):
                continue  # views of the side-by-side copy: DecodeSwiGLU multiplies by that copy
            if type(child) is nn.Linear:
                if tied and child is model.lm_head:
                    # the head is the embedding table: a transposed copy would double it, so keep F.linear unless
                    # another kernel wins (then the copy is the price of the speed; the embedding keeps its own)
                    k = choose(child.weight)
                    new = _convert_linear(child, k)
                    if k == "linear":
                        new.weight = model.wte.weight
                    setattr(module, child_name, new)
                else:
                    setattr(module, child_name, _convert_linear(child, choose(child.weight)))
    model.decode_kernels = {f"{o}x{i}": k for (o, i), k in chosen.items()}
    return model


def onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, post: str = "none", algorithm: str = ""
) -> torch.Tensor:
    """x @ W^T + bias by oneDNN on its packed copy of W (`torch.ops.mkldnn._reorder_linear_weight`), then the
    elementwise `post` op fused into the same kernel ("gelu" with algorithm "tanh": GPT-2's GELU)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [], algorithm)


def _product(layer: nn.Linear, several: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`layer.forward` for an input [B, 1, in] as a plain function, its kernel resolved now: one row (several
    False) by the layer's one-row kernel, several rows by its oneDNN-packed copy when it has one (see
    `jojo.infer.batch.convert_for_batches`), otherwise `F.linear`."""
    bias = layer.bias
    packed = getattr(layer, "packed", None) if several else None
    wt = None if several else getattr(layer, "wt", None)
    if packed is not None:
        return lambda x: onednn_linear(x, packed, bias)
    if wt is None:
        weight = layer.weight
        return lambda x: F.linear(x, weight, bias)
    kernel, shape = layer.kernel, (1, 1, layer.out_features)
    return lambda x: row_product(x, wt, kernel, bias, shape)


def _norm(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if type(norm) is nn.LayerNorm:
        return functools.partial(F.layer_norm, normalized_shape=norm.normalized_shape, weight=norm.weight,
                                 bias=norm.bias, eps=norm.eps)  # fmt: skip
    return norm.forward


def _mlp(mlp: nn.Module, several: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The block's MLP for an input [B, 1, C]. GPT-2's (GeluMLP.forward with its products resolved; for several
    rows with a packed first product, the GELU fused into that product's kernel); SwiGLU: its own forward."""
    if not isinstance(mlp, GeluMLP):
        return mlp.forward
    fc, proj = _product(mlp.fc, several), _product(mlp.proj, several)
    packed, bias = getattr(mlp.fc, "packed", None) if several else None, mlp.fc.bias
    if packed is not None:
        return lambda x: proj(onednn_linear(x, packed, bias, "gelu", "tanh"))
    return lambda x: proj(F.gelu(fc(x), approximate="tanh"))


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`jojo.model.apply_rope` with the sign of its rotation moved into the sine (signed_sin = [-sin1, sin2] for
    sin = [sin1, sin2]): x * cos + roll(x) * signed_sin is x * cos + [-x2, x1] * sin, the same numbers bit for bit
    (the DecodeStep test compares logits exactly) in two operations fewer per layer (9.5 vs 17 us for 8 rows)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin


class DecodeStep:
    """`GPT.forward(idx, cache=..., positions=..., attn_mask=..., last_only=True)` for one new token per row.

    The model's own modules do the work (each linear layer, norm and MLP through its `forward`, so a converted
    model's kernels are used), but the block and attention structure is written out here for T = 1, skipping
    `nn.Module.__call__` and the shape handling a longer input needs. For inference (no dropout); works for any
    GPT (converted or not, any device or dtype).

    idx: [B, 1] token ids; pos: [B, 1] their positions; cache: a `KVCache` or the batched engine's cache
    (anything with `store(layer, k, v)` and `advance(n)`); mask: None (every stored key is seen) or [B, 1, 1, S]
    over the keys `store` returns; or, instead of a mask, lengths: int64 [B], row b sees its first lengths[b]
    keys, through `attend` (`jojo.infer.native.decode_attention()`, given at construction), which also stores the
    new keys into the planned decode rows of the batched cache (`cache.decode_rows(layer)`). Returns logits
    [B, 1, V]."""

    def __init__(self, model: GPT, attend: Callable | None = None):
        cfg = model.config
        self.model = model
        self.attend = attend
        self.H, self.KV, self.D, self.C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        self.rope, self.gqa = model.wpe is None, cfg.n_kv_head != cfg.n_head
        # each block's parts as plain functions, for one row ([0]) and for several ([1]); kernels resolved now
        self.layers = [
            [
                (
                    _norm(b.norm1),
                    _product(b.attn.qkv, several),
                    _product(b.attn.proj, several),
                    _norm(b.norm2),
                    _mlp(b.mlp, several),
                )
                for b in model.blocks
            ]
            for several in (False, True)
        ]
        self.norm_f = _norm(model.norm_f)
        self.head = [_product(model.lm_head, several) for several in (False, True)]

    def __call__(self, idx, pos, cache, mask=None, lengths=None) -> torch.Tensor:
        m, H, KV, D = self.model, self.H, self.KV, self.D
        B = idx.shape[0]
        x = F.embedding(idx, m.wte.weight)
        if self.rope:
            cos, sin = m.rope_cos[pos].unsqueeze(1).to(x.dtype), m.rope_sin[pos].unsqueeze(1).to(x.dtype)
            half = D // 2  # the rotation's sign moved into the sine (see _rope)
            sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        else:
            x = x + F.embedding(pos, m.wpe.weight)
        for i, (norm1, qkv_fn, proj, norm2, mlp) in enumerate(self.layers[B > 1]):
            qkv = qkv_fn(norm1(x)).view(B, 1, H + 2 * KV, D).transpose(1, 2)
            if self.rope:
                q, k = _rope(qkv[:, : H + KV], cos, sin).split([H, KV], dim=1)
                v = qkv[:, H + KV :]
            else:
                q, k, v = qkv.split([H, KV, KV], dim=1)
            if lengths is not None:  # the C kernel stores the new keys and values itself, then attends
                y = self.attend(q, k, v, *cache.decode_rows(i), lengths)  # [B, 1, C]
            else:
                k, v = cache.store(i, k, v)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)
                y = y.transpose(1, 2).reshape(B, 1, self.C)
            x = x + proj(y)
            x = x + mlp(norm2(x))
        cache.advance(1)
        return self.head[B > 1](self.norm_f(x))
