"""LoRA (Hu et al., 2021): train a low-rank update of chosen weight matrices, keep the base frozen.

A targeted linear layer computes  y = x W^T + b + (alpha / r) * (x A^T) B^T,  A: [r, in], B: [out, r].
A starts random (Kaiming-uniform, as in the paper's reference code) and B at zero, so training starts from
the base model exactly. Only A and B have requires_grad, so the optimizer sees nothing else.

Checkpoints hold merged weights, W + (alpha / r) B A, under the base model's names: every other command
(generate, chat, eval, export) reads a LoRA run's checkpoint as a plain GPT. The adapters are applied from
outside the model file, by swapping the targeted `nn.Linear` modules for `LoRALinear`s that share their weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from jojo.errors import JojoError

# Target names -> module-path suffixes. "proj" is attention's output projection (the usual LoRA choice).
TARGETS = {
    "qkv": ("attn.qkv",),
    "proj": ("attn.proj",),
    "attn": ("attn.qkv", "attn.proj"),
    "fc": ("mlp.fc",),
    "gate": ("mlp.gate",),
    "up": ("mlp.up",),
    "mlp_proj": ("mlp.proj",),
    "mlp": ("mlp.fc", "mlp.gate", "mlp.up", "mlp.proj"),
    "lm_head": ("lm_head",),
}


class LoRALinear(nn.Linear):
    """An `nn.Linear` whose weight and bias are the frozen base layer's own tensors, plus a trainable low-rank
    update. State-dict names of the base tensors are unchanged (`...qkv.weight`); the adapters add
    `...qkv.lora_A` / `...qkv.lora_B`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weights are the base layer's, not new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return super().forward(x) + self.scaling * update

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


def parse_targets(targets: str | list[str]) -> list[str]:
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise JojoError(f"unknown LoRA target(s) {unknown or targets!r}; choose from {', '.join(TARGETS)}")
    return names


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str | list[str] = "qkv,proj"):
    """Freeze every parameter, then wrap the targeted linear layers with adapters. Returns their names."""
    if rank <= 0:
        raise JojoError(f"LoRA rank must be > 0, got {rank}")
    alpha = float(alpha) if alpha else 2.0 * rank
    suffixes = tuple(s for t in parse_targets(targets) for s in TARGETS[t])
    if "lm_head" in suffixes and getattr(model.config, "tie_embeddings", False):
        raise JojoError("LoRA on lm_head needs untied embeddings (the head is the embedding table here)")
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and name.endswith(suffixes)
    ]
    if not chosen:
        raise JojoError(f"LoRA targets {targets!r} match no layer of this model (a {model.config.family} model)")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter folded in, under the plain model's names (tied tensors once)."""
    from jojo.checkpoint import unique_state_dict

    weights = unique_state_dict(model)
    for name, m in lora_modules(model).items():
        weights[f"{name}.weight"] = (m.weight + m.delta().to(m.weight.dtype)).detach().contiguous().cpu()
        weights.pop(f"{name}.lora_A", None)
        weights.pop(f"{name}.lora_B", None)
    return weights


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights in place and put plain `nn.Linear` layers back."""
    for name, m in lora_modules(model).items():
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
        plain.weight.copy_(m.weight + m.delta().to(m.weight.dtype))
        if m.bias is not None:
            plain.bias.copy_(m.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_summary(model: nn.Module, adapted: list[str], cfg) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "rank": cfg.rank,
        "alpha": float(cfg.alpha) if cfg.alpha else 2.0 * cfg.rank,
        "targets": cfg.targets,
        "matrices": len(adapted),
        "trainable": trainable,
        "total": total,
    }
