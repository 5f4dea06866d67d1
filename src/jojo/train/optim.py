"""Optimizers: AdamW with weight decay on matrices only, and Muon for hidden matrices.

Parameter groups follow the rule nanoGPT and nanochat use: tensors with two or more dimensions (linear
weights, embeddings) are decayed; biases and norm gains are not.

Muon (Keller Jordan, 2024; used by modded-nanogpt and nanochat) applies to the 2-D weights inside the
transformer blocks: it takes SGD-momentum's update and replaces it by the nearest semi-orthogonal matrix
(U V^T of its SVD), computed with a few Newton-Schulz iterations. Embeddings, the head, norms and biases stay
on AdamW.
"""

from __future__ import annotations

import inspect

import torch

from jojo.config import OptimizerConfig

# Quintic Newton-Schulz coefficients from the Muon write-up: they push all singular values into about
# [0.7, 1.2] in five steps, which is as good as exact orthogonalisation for the update's purpose.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=torch.float32) -> torch.Tensor:
    """Approximate U V^T for G = U S V^T by Newton-Schulz iteration: X <- aX + b(XX^T)X + c(XX^T)^2 X.

    dtype: what the iteration computes in. bfloat16 is what Muon's authors use (the result only needs singular
    values near 1, which the iteration gets to within bf16's precision); on a CPU with native bf16 it halves the
    time, which at 12M parameters was 0.76 s of a ~1.3 s step in float32."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1, inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised, scaled so its RMS matches AdamW's
    (0.2 * sqrt(max(m, n)), as in Moonshot's Muon scaling), with decoupled weight decay."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5,
                 ns_dtype=torch.float32):  # fmt: skip
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov
                update = orthogonalize(update, group["ns_steps"], dtype=self.ns_dtype)
                scale = 0.2 * max(p.shape[0], p.shape[1]) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)
        return loss


class OptimizerList:
    """Several optimizers stepped together (Muon + AdamW), with one state_dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, st in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(st)


def _adamw(groups, cfg: OptimizerConfig, device_type: str) -> torch.optim.AdamW:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        # One kernel per parameter for the whole update, instead of ~8 elementwise passes over memory: on CPU
        # the unfused update was a quarter of a 13.9M-model training step (benchmarks/train_throughput.py).
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerConfig, device_type: str = "cpu", compute_dtype=torch.float32
) -> OptimizerList:
    """Every param group records its peak LR as `base_lr`; the loop scales `lr` from it each step. Muon's
    Newton-Schulz iteration runs in bfloat16 when the run computes in bfloat16 (`compute_dtype`), else float32."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "muon":
        hidden = [p for n, p in named if p.ndim == 2 and n.startswith("blocks.")]
        hidden_ids = {id(p) for p in hidden}
        rest = [(n, p) for n, p in named if id(p) not in hidden_ids]
    else:
        hidden, rest = [], named
    decay = [p for _, p in rest if p.ndim >= 2]
    no_decay = [p for _, p in rest if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    optimizers: list[torch.optim.Optimizer] = [_adamw([g for g in groups if g["params"]], cfg, device_type)]
    if hidden:
        muon = Muon(
            [{"params": hidden, "base_lr": cfg.muon_lr}],
            lr=cfg.muon_lr,
            momentum=cfg.muon_momentum,
            weight_decay=cfg.weight_decay,
            ns_dtype=torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32,
        )
        optimizers.insert(0, muon)
    return OptimizerList(optimizers)
