"""The inference-only conversion for fast one-row CPU decoding (jojo.infer.decode): every kernel computes what
F.linear computes, the conversion keeps parameter names and values, and generation is unchanged by it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jojo.config import ModelConfig
from jojo.infer import decode
from jojo.infer.decode import DecodeLinear, DecodeSwiGLU, convert_for_decoding, one_row, pick_kernel, time_turns
from jojo.infer.engine import SamplingConfig, generate
from jojo.model import GPT

KERNELS = [k for k in decode.KERNELS if k != "bag" or decode._FBGEMM]


@pytest.mark.parametrize("kernel", ["matmul", "bag"])
def test_one_row_kernels_match_f_linear_for_any_thread_count(kernel):
    if kernel == "bag" and not decode._FBGEMM:
        pytest.skip("no FBGEMM in this torch build")
    torch.manual_seed(0)
    w = torch.randn(200, 96)
    wt = w.t().contiguous()
    x = torch.randn(1, 1, 96)
    for threads in (1, 2, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = one_row(wt, x, kernel)
        finally:
            torch.set_num_threads(before)
        assert y.shape == (200,)
        assert torch.allclose(y, F.linear(x, w)[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_converted_linear_matches_the_plain_layer_one_row_and_batched(kernel, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 200, bias=bias)
    ref_w, ref_b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    converted = decode._convert_linear(layer, kernel)
    assert isinstance(converted, DecodeLinear) and converted.kernel == kernel
    assert torch.equal(converted.weight, ref_w)  # same values under the same name
    for x in (torch.randn(1, 1, 96), torch.randn(96), torch.randn(3, 5, 96)):
        with torch.inference_mode():
            assert torch.allclose(converted(x), F.linear(x, ref_w, ref_b), rtol=1e-5, atol=1e-5)
    if kernel != "linear":
        # the weight is a view of the transposed copy: an in-place change (load_state_dict does one) reaches both
        assert converted.weight.data_ptr() == converted.wt.data_ptr()
        with torch.no_grad():
            converted.weight.mul_(-2.0)
        x = torch.randn(1, 1, 96)
        assert torch.allclose(converted(x), F.linear(x, -2.0 * ref_w, ref_b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", *KERNELS])
def test_swiglu_gate_and_up_in_one_product(kernel):
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    model = GPT(cfg)
    mlp = model.blocks[0].mlp
    x = torch.randn(1, 1, 32)
    gate_w, up_w, proj_w = (m.weight.detach().clone() for m in (mlp.gate, mlp.up, mlp.proj))

    def reference(inp):  # the formula with F.linear, no fast path
        return F.linear(F.silu(F.linear(inp, gate_w)) * F.linear(inp, up_w), proj_w)

    convert_for_decoding(model, kernel=kernel)
    fused = model.blocks[0].mlp
    assert isinstance(fused, DecodeSwiGLU)
    # gate and up stay plain views of the shared copy (never converted into copies of their own)
    assert type(fused.gate) is nn.Linear and type(fused.up) is nn.Linear
    storage = fused.wt.untyped_storage().data_ptr()
    assert fused.gate.weight.untyped_storage().data_ptr() == storage == fused.up.weight.untyped_storage().data_ptr()
    # one copy holds gate and up side by side; the layers' weights are views of it (names and values kept)
    assert torch.equal(fused.wt, torch.cat([gate_w.t(), up_w.t()], dim=1))
    assert torch.equal(fused.gate.weight, gate_w) and torch.equal(fused.up.weight, up_w)
    assert set(model.state_dict()) >= {"blocks.0.mlp.gate.weight", "blocks.0.mlp.up.weight"}
    with torch.inference_mode():
        assert torch.allclose(fused(x), reference(x), rtol=1e-5, atol=1e-6)
        xs = torch.randn(2, 4, 32)
        assert torch.allclose(fused(xs), reference(xs), rtol=1e-5, atol=1e-5)
        fused.up.weight.mul_(3.0)  # an in-place update of one of the two: the shared copy follows
    with torch.inference_mode():
        up_w.mul_(3.0)
        assert torch.allclose(fused(x), reference(x), rtol=1e-5, atol=1e-6)


def test_time_turns_lets_the_candidates_take_turns():
    # one after the other, a burst of other work on the machine lands on whichever candidate runs then (it made
    # oneDNN lose shapes it wins by 2x while other processes loaded); in turns, it slows them alike
    order = []
    times = time_turns({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, lambda: order.append("-"))
    assert order == ["a", "b"] + ["-", "a", "-", "b"] * 3
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_pick_kernel_times_every_candidate():
    kernel, times = pick_kernel(torch.randn(64, 32))
    assert kernel in times and set(times) == set(KERNELS) and all(t > 0 for t in times.values())


def test_pick_kernel_cold_times_every_weight_of_the_shape_after_an_eviction():
    calls = []
    weights = [torch.randn(64, 32) for _ in range(3)]
    kernel, times = pick_kernel(weights[0], others=tuple(weights[1:]), evict=lambda: calls.append(1))
    assert kernel in times and set(times) == set(KERNELS) and all(t > 0 for t in times.values())
    assert len(calls) == 9 * len(KERNELS)  # before every timed pass of every candidate
    # the model's conversion groups its weights by shape: SwiGLU's gate and up as one matrix per block
    cfg = ModelConfig(family="llama", vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32)
    groups = decode._decode_weights(GPT(cfg))
    hidden = cfg.mlp_hidden
    assert len(groups[(2 * hidden, 32)]) == 2 and len(groups[(32, hidden)]) == 2
    assert (hidden, 32) not in groups


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kernel", ["auto", *KERNELS])
def test_converted_model_generates_the_same_tokens(family, kernel):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=96, block_size=48, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg).eval()
    sc = SamplingConfig(max_tokens=20, temperature=0)
    prompt = [1, 5, 9, 2]
    with torch.no_grad():
        logits_ref, _ = model(torch.tensor([prompt]))
    expected = generate(model, prompt, sc, 96)
    fast = convert_for_decoding(model, kernel=kernel)
    assert fast.decode_kernels and not any(p.requires_grad for p in fast.parameters())
    assert generate(fast, prompt, sc, 96) == expected
    with torch.no_grad():
        logits, _ = fast(torch.tensor([prompt]))
    assert torch.allclose(logits, logits_ref, rtol=1e-4, atol=1e-5)
    assert convert_for_decoding(fast) is fast  # converting twice changes nothing


def test_conversion_leaves_other_dtypes_alone():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)).to(torch.bfloat16)
    convert_for_decoding(model)
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())
