"""Which outside architecture a Jojo model maps onto, decided from its parts (never from its family name).

transformers' GPT2LMHeadModel and llama.cpp's `gpt2` are learned positions + LayerNorm + GELU MLP with one head
per key/value; LlamaForCausalLM and llama.cpp's `llama` are RoPE + RMSNorm + SwiGLU (grouped-query attention and
biases allowed). Any other combination of parts (a GPT-2 block with RoPE, say) trains and generates in Jojo but
loads in neither without custom code, so export refuses it in one line.
"""

from __future__ import annotations

from jojo.config import ModelConfig
from jojo.errors import JojoError

ARCHS = {
    "gpt2": {"positions": "learned", "norm": "layernorm", "mlp": "gelu"},
    "llama": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
}


def export_arch(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama' (the names transformers and llama.cpp use), or a JojoError naming what does not fit."""
    parts = {k: getattr(cfg, k) for k in ("positions", "norm", "mlp")}
    for arch, want in ARCHS.items():
        if parts == want:
            if arch == "gpt2" and cfg.n_kv_head != cfg.n_head:
                raise JojoError(
                    f"this model has n_kv_head={cfg.n_kv_head} < n_head={cfg.n_head} (grouped-query attention) in "
                    "GPT-2 blocks, which GPT2LMHeadModel and llama.cpp's gpt2 cannot load; export needs "
                    "n_kv_head == n_head, or the llama parts (positions=rope, norm=rmsnorm, mlp=swiglu)"
                )
            return arch
    have = ", ".join(f"{k}={v}" for k, v in parts.items())
    raise JojoError(
        f"this model's parts ({have}) match neither GPT-2 (positions=learned, norm=layernorm, mlp=gelu) nor Llama "
        "(positions=rope, norm=rmsnorm, mlp=swiglu), so transformers and llama.cpp cannot load it without custom "
        "code; it still works with every jojo command"
    )
