"""The batched decode step's attention in C (jojo.infer.native): built with the system's compiler, the same
numbers as PyTorch's attention to float rounding, and PyTorch's attention wherever it cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from jojo.infer import native
from jojo.infer.batch import BatchEngine, BatchKVCache
from jojo.infer.engine import SamplingConfig, generate_stream
from jojo.model import GPT

HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """decode_attention() looked up again, built into an empty cache directory; the real one restored after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.decode_attention.cache_clear()
    yield
    native.decode_attention.cache_clear()


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
@pytest.mark.parametrize("heads, kv_heads", [(6, 6), (6, 2)])
def test_kernel_stores_the_new_keys_and_attends_as_pytorch_does(heads, kv_heads, fresh_kernel, tmp_path):
    attend = native.decode_attention()
    assert attend is not None and list((tmp_path / "jojo" / "kernels").glob("decode_attention-*.so"))
    torch.manual_seed(0)
    cfg = tiny_model_config("llama", n_head=heads, n_kv_head=kv_heads, n_embd=48, block_size=64)
    cache = BatchKVCache(cfg, 5, 64)
    cache.k.normal_(), cache.v.normal_()
    D = cfg.head_dim
    lengths = torch.tensor([1, 17, 40, 3, 33])  # rows at their own positions, one that sees a single key
    span = int(lengths.max())
    cache.plan_decode(lengths - 1, span)
    for layer in range(cfg.n_layer):
        before_k, before_v = cache.k[layer].clone(), cache.v[layer].clone()
        qkv = torch.randn(5, 1, heads + 2 * kv_heads, D).transpose(1, 2)  # views, as DecodeStep makes them
        q, k_new, v_new = qkv.split([heads, kv_heads, kv_heads], dim=1)
        out = attend(q, k_new, v_new, *cache.decode_rows(layer), lengths)
        k, v = before_k[:, :, :span], before_v[:, :, :span]
        for b, n in enumerate(lengths.tolist()):
            k[b, :, n - 1], v[b, :, n - 1] = k_new[b, :, 0], v_new[b, :, 0]
        assert torch.equal(cache.k[layer], before_k) and torch.equal(cache.v[layer], before_v)  # only those moved
        mask = (torch.arange(span).view(1, span) < lengths.view(5, 1)).view(5, 1, 1, span)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
        torch.testing.assert_close(out, ref.transpose(1, 2).reshape(5, 1, -1))
    with pytest.raises(ValueError, match="int64 lengths"):
        attend(q, k_new, v_new, *cache.decode_rows(0), lengths.int())
    k, v = cache.decode_rows(0)
    with pytest.raises(ValueError, match="k/v"):  # fewer cache rows than queries: refused, never read past
        attend(q, k_new, v_new, k[:4], v[:4], lengths)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_engine_decodes_with_the_kernel_and_without_it_alike(family, fresh_kernel, monkeypatch, tokenizer):
    """With the kernel (where a compiler is) and with PyTorch's attention (a compiler that fails, JOJO_NATIVE=0),
    several rows decoded together give every request its single-sequence tokens."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config(family, vocab_size=tokenizer.vocab_size, block_size=96)).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,), generator=g).tolist() for n in (4, 19, 9)]
    sc = SamplingConfig(max_tokens=20, temperature=0.0)
    expected = [list(generate_stream(model, p, sc, tokenizer.vocab_size, set())) for p in prompts]
    for how in ("kernel", "failing compiler", "turned off"):
        native.decode_attention.cache_clear()
        if how == "failing compiler":
            monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
        if how == "turned off":
            monkeypatch.delenv("CC")
            monkeypatch.setenv("JOJO_NATIVE", "0")
        engine = BatchEngine(model, tokenizer, max_batch=3)
        assert (engine._attend is not None) == (how == "kernel" and HAS_CC), how
        results = engine.generate_many(prompts, sc, stop_ids=())
        assert [r.token_ids for r in results] == expected, how
