"""The GPT: architecture only.

One decoder-only transformer whose parts are independent `ModelConfig` choices, resolved once when the modules
are built (forward never branches on them):

- positions: ``learned`` (an absolute position table) | ``rope`` (rotary embeddings on q and k);
- norm: ``layernorm`` | ``rmsnorm``;  mlp: ``gelu`` (GPT-2's tanh GELU) | ``swiglu``;
- bias on every linear layer and LayerNorm, tied input/output embeddings, and ``n_kv_head`` < ``n_head`` for
  grouped-query attention.

The families are named presets of these: ``gpt2`` = learned, layernorm, gelu, biases, tied; ``llama`` = rope,
rmsnorm, swiglu, no biases, optional tying. No optimizer, device policy, precision, distributed code or speed
trick for a particular device lives here: those are applied to the model from outside (`jojo.train` wraps it
for training, `jojo.infer.decode` converts it for fast CPU decoding).

Attention goes through `F.scaled_dot_product_attention`. Generation uses a `KVCache` that the caller owns.
Packed sequences (several documents in one row, as SFT packs conversations) pass `doc_ids`: attention then
never crosses a document boundary and positions restart at each document, so a document's logits are the
same alone or packed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from jojo.config import ModelConfig

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (masked prompt tokens, padding)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's own op: bitwise equal to the lines below in float32, in fewer dispatched calls
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 (as Hugging Face's Llama does) so bf16 activations do not lose the scale.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.up(x))


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [length, head_dim] in the 'rotate half' layout used by Hugging Face's Llama."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B or 1, 1, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, filled left to right.

    The caller creates one per generation and passes it to `GPT.forward`; `pos` is how many positions
    are already stored. Preallocated, so decoding never reallocates."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views, made once
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def advance(self, n: int) -> None:
        """Called by `GPT.forward` once the n new positions of every layer are stored."""
        self.pos += n

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        # narrow/copy_ on the per-layer views: the same writes as self.k[layer, :, :, pos:end] = k, with fewer
        # indexing ops (this runs once per layer per decoded token).
        k_all, v_all = self._k_layers[layer], self._v_layers[layer]
        k_all.narrow(2, self.pos, T).copy_(k)
        v_all.narrow(2, self.pos, T).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, rope, mask, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        H, KV = self.n_head, self.n_kv_head
        # One view of all heads, [B, H + 2*KV, T, D]: q, k and v are slices of it along the head axis.
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(qkv[:, : H + KV], *rope).split([H, KV], dim=1)  # q and k rotated in one go
            v = qkv[:, H + KV :]
        else:
            q, k, v = qkv.split([H, KV, KV], dim=1)
        if cache is not None:
            k, v = cache.store(self.layer, k, v)
        # mask is None -> plain causal attention over this chunk (no cache, or a prefill from position 0);
        # a single decoded token with a cache sees everything stored, which `is_causal=False` gives.
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=KV != H,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = GeluMLP(cfg) if cfg.mlp == "gelu" else SwiGLU(cfg)

    def forward(self, x, rope, mask, cache):
        x = x + self.attn(self.norm1(x), rope, mask, cache)
        return x + self.mlp(self.norm2(x))


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document: [B, T] -> [B, T], restarting at 0 at each new doc."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if self.wpe is None:
            cos, sin = rope_tables(cfg, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink with depth so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- sizes -------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once. non_embedding drops the token and position tables
        (the lm_head stays when it is untied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:

            6 * N_matmul + 12 * n_layer * n_embd * T

        N_matmul counts the weights of every matrix multiply (all linear layers and the lm_head, even when
        tied); the embedding lookups are not multiplies. The second term is attention's QK^T and AV over a
        context of T tokens (taken as the full block; causal masking halves the useful part, which the
        formula conventionally ignores)."""
        T = seq_len or self.config.block_size
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * n_matmul + 12.0 * self.config.n_layer * self.config.n_embd * T

    # ---- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: [B, T] token ids. Returns (logits [B, T, V] (or [B, 1, V] with last_only), mean loss or None).

        targets: [B, T] next-token ids, IGNORE_INDEX where no loss is wanted.
        doc_ids: [B, T] document index of each token for packed rows (no cross-document attention).
        cache:   a KVCache; the new tokens sit at positions cache.pos .. cache.pos+T-1.
        positions, attn_mask: for a cache whose rows are at different positions (a batched engine's): the
                 position of each new token [B, T] and the mask [B, 1, T, S] of the keys each may see (boolean,
                 or additive: 0 or -inf; S = what `cache.store` returns); the cache's `store` places the keys,
                 `advance` is called after.
        """
        B, T = idx.shape
        if positions is not None:
            if int(positions.max()) >= self.config.block_size:
                raise ValueError(f"position {int(positions.max())} exceeds the context {self.config.block_size}")
            return self._run(idx, targets, positions, attn_mask, cache, last_only, T)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.config.block_size}")
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed rows) cannot be combined with a KV cache")
            pos = positions_from_doc_ids(doc_ids)
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (same_doc & causal)[:, None]
        else:
            pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
            mask = None
            if cache is not None and start > 0 and T > 1:
                # A chunk appended after cached tokens: it sees all of the cache and is causal within itself.
                mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        return self._run(idx, targets, pos, mask, cache, last_only, T)

    def _run(self, idx, targets, pos, mask, cache, last_only: bool, T: int):
        """The transformer proper, once positions [B or 1, T] and the attention mask are known."""
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
            rope = None
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [B or 1, T, D]
            rope = (cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, dtype or p.dtype)
