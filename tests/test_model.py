import math

import pytest
import torch

from conftest import tiny_model_config
from jojo.config import ModelConfig
from jojo.errors import JojoError
from jojo.infer.engine import SamplingConfig, generate
from jojo.model import GPT

# The two families, and a mix of parts from both (a GPT-2 block with RoPE, RMSNorm and grouped-query attention:
# one config line), which every model test runs on too.
VARIANTS = {
    "gpt2": {},
    "llama": {},
    "gpt2+rope+rmsnorm+gqa": {"positions": "rope", "norm": "rmsnorm", "n_kv_head": 2},
}
FAMILIES = list(VARIANTS)


def make(family, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny_model_config(family.split("+")[0], **VARIANTS[family], **kw)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_mask_future_tokens_do_not_change_past_logits(family):
    model = make(family)
    x = torch.randint(0, 512, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, 512, (2, 15))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=1e-5)
    assert (a[:, 25:] - b[:, 25:]).abs().max() > 1e-3  # and the future does matter


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_kv_cache_generation_equals_full_recompute(family, temperature):
    model = make(family, seed=1)
    prompt = torch.randint(0, 512, (9,)).tolist()
    sc = SamplingConfig(max_tokens=40, temperature=temperature, top_k=20, top_p=0.95, repetition_penalty=1.1)
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    cached = generate(model, prompt, sc, 512, use_cache=True, generator=g1)
    full = generate(model, prompt, sc, 512, use_cache=False, generator=g2)
    assert len(cached) == 40
    assert cached == full


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_match_uncached(family):
    model = make(family, seed=2)
    x = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(1)
        model(x[:, :10], cache=cache)  # prefill
        chunk, _ = model(x[:, 10:20], cache=cache)  # a chunk after cached tokens
        outs = [model(x[:, t : t + 1], cache=cache)[0] for t in range(20, 30)]
    torch.testing.assert_close(chunk, full[:, 10:20], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 20:30], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_do_not_see_each_other(family):
    model = make(family, seed=3)
    a = torch.randint(0, 512, (1, 12))
    b = torch.randint(0, 512, (1, 20))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 12 + [1] * 20])
    with torch.no_grad():
        alone_a, _ = model(a)
        alone_b, _ = model(b)
        both, _ = model(packed, doc_ids=doc_ids)
    torch.testing.assert_close(both[:, :12], alone_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[:, 12:], alone_b, rtol=1e-4, atol=1e-5)


def test_families_differ_as_specified():
    g = make("gpt2")
    ll = make("llama")
    assert g.wpe is not None and ll.wpe is None
    assert g.lm_head.weight is g.wte.weight  # gpt2 ties by default
    assert ll.lm_head.weight is not ll.wte.weight
    assert isinstance(g.blocks[0].norm1, torch.nn.LayerNorm)
    assert type(ll.blocks[0].norm1).__name__ == "RMSNorm"
    assert type(ll.blocks[0].mlp).__name__ == "SwiGLU"
    # grouped-query attention: 4 query heads share 2 key/value heads
    q, k, v = 4 * 8, 2 * 8, 2 * 8
    assert ll.blocks[0].attn.qkv.weight.shape[0] == q + k + v
    assert ll.blocks[0].attn.qkv.bias is None and g.blocks[0].attn.qkv.bias is not None


def test_parameter_count_gpt2_124m():
    cfg = ModelConfig(family="gpt2", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    model = GPT(cfg)
    assert model.num_params() == 124_439_808  # the published GPT-2 small count
    # 6N + 12 L d T for the matmul weights (incl. the tied head), per token
    n_matmul = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    assert model.flops_per_token(1024) == 6 * n_matmul + 12 * 12 * 768 * 1024


def test_loss_ignores_masked_targets():
    model = make("gpt2")
    x = torch.randint(0, 512, (2, 16))
    t = torch.randint(0, 512, (2, 16))
    masked = t.clone()
    masked[:, :8] = -100
    with torch.no_grad():
        _, full = model(x, t)
        _, part = model(x, masked)
        logits, _ = model(x)
    ref = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, logits.shape[-1]), t[:, 8:].reshape(-1))
    assert math.isclose(float(part), float(ref), rel_tol=1e-5)
    assert not math.isclose(float(full), float(part), rel_tol=1e-3)


def test_config_validation_names_the_key():
    with pytest.raises(JojoError, match="model.family"):
        ModelConfig(family="mamba")
    with pytest.raises(JojoError, match="n_kv_head"):
        ModelConfig(family="llama", n_head=4, n_kv_head=3, n_embd=32)


def test_context_overflow_is_an_error():
    model = make("gpt2")
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(JojoError, match="context"):
        generate(model, list(range(64)), SamplingConfig(max_tokens=5), 512)


def test_rms_norm_matches_its_formula_in_float32_and_bf16():
    from jojo.model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 64) * 7

    def formula(x, weight):  # Hugging Face's LlamaRMSNorm: normalise in float32, scale in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return weight * h.to(x.dtype)

    assert torch.equal(norm(x), formula(x, norm.weight))  # the fused F.rms_norm path, bitwise
    xb, nb = x.bfloat16(), RMSNorm(64, 1e-5).bfloat16()
    with torch.no_grad():
        nb.weight.copy_(norm.weight)
    assert nb(xb).dtype == torch.bfloat16 and torch.equal(nb(xb), formula(xb, nb.weight))


def test_parts_are_independent_choices():
    mixed = make("gpt2+rope+rmsnorm+gqa")
    c = mixed.config
    assert (c.positions, c.norm, c.mlp, c.bias, c.tie_embeddings) == ("rope", "rmsnorm", "gelu", True, True)
    assert mixed.wpe is None and hasattr(mixed, "rope_cos")
    assert type(mixed.blocks[0].norm1).__name__ == "RMSNorm" and type(mixed.blocks[0].mlp).__name__ == "GeluMLP"
    llama_gelu = GPT(ModelConfig(family="llama", mlp="gelu", vocab_size=64, block_size=16, n_layer=1, n_head=2,
                                 n_embd=32))  # fmt: skip
    assert llama_gelu.config.mlp_hidden == 128 and type(llama_gelu.blocks[0].mlp).__name__ == "GeluMLP"
    with pytest.raises(JojoError, match="model.positions"):
        ModelConfig(positions="alibi")
    with pytest.raises(JojoError, match="even for RoPE"):
        ModelConfig(positions="rope", n_embd=30, n_head=2)
