"""The batched engine: per-row positions and masks, continuous batching, chunked prefill, per-request sampling,
stop strings and UTF-8 hold-back, cancel, the queue limit, the engine's thread; against `generate_stream`."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from jojo.infer.batch import BatchEngine, BatchKVCache, QueueFull, Request, convert_for_batches
from jojo.infer.decode import DecodeStep, convert_for_decoding, onednn_linear
from jojo.infer.engine import SamplingConfig, generate_stream
from jojo.model import GPT
from jojo.tokenizer import byte_level_alphabet

GREEDY = SamplingConfig(max_tokens=24, temperature=0.0)


def make_model(family: str, tokenizer, block_size: int = 96, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    # vocab padded above the tokenizer's (as checkpoints may be): ids >= tok.vocab_size must never be sampled
    model = GPT(tiny_model_config(family, vocab_size=tokenizer.vocab_size + 64, block_size=block_size)).eval()
    with torch.no_grad():  # make the padding rows the most likely, so a leak would show
        model.lm_head.weight[tokenizer.vocab_size :] = model.lm_head.weight[:64] * 5
    return model


def prompts_of(tokenizer, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tokenizer.vocab_size, (n,), generator=g).tolist() for n in lengths]


def reference(model, tokenizer, prompt, sc=GREEDY, stop_ids=None) -> list[int]:
    stop = {tokenizer.eot_id} if stop_ids is None else set(stop_ids)
    return list(generate_stream(model, prompt, sc, tokenizer.vocab_size, stop))


@pytest.mark.parametrize("family, kernel", [("gpt2", "onednn"), ("llama", "onednn"), ("llama", "linear")])
def test_batched_greedy_equals_single_sequence_with_mixed_lengths_and_arrivals(family, kernel, tokenizer):
    model = convert_for_batches(convert_for_decoding(make_model(family, tokenizer)), 4, kernel=kernel)
    if torch.backends.mkldnn.is_available():
        assert set(model.batch_kernels.values()) == {kernel}
    engine = BatchEngine(model, tokenizer, max_batch=4, prefill_chunk=8)
    # lengths above the chunk (prefilled over several steps) and below; more requests than rows
    prompts = prompts_of(tokenizer, [3, 17, 1, 30, 9, 5, 22, 12])
    budgets = [24, 5, 30, 12, 24, 40, 7, 24]
    reqs = [engine.submit(p, SamplingConfig(max_tokens=m, temperature=0.0)) for p, m in zip(prompts[:3], budgets)]
    for _ in range(3):
        engine.step()
    reqs += [engine.submit(p, SamplingConfig(max_tokens=m, temperature=0.0)) for p, m in zip(prompts[3:6], budgets[3:])]
    engine.step()
    reqs += [engine.submit(p, SamplingConfig(max_tokens=m, temperature=0.0)) for p, m in zip(prompts[6:], budgets[6:])]
    engine.run_until_done(reqs)
    for p, m, r in zip(prompts, budgets, reqs):
        expected = reference(model, tokenizer, p, SamplingConfig(max_tokens=m, temperature=0.0))
        assert r.tokens == expected
        assert all(t < tokenizer.vocab_size for t in r.tokens)
        assert r.finish_reason == ("length" if len(expected) == m else "stop")
        assert r.text == tokenizer.decode(r.tokens)
    assert engine.stats()["running"] == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rows_at_different_positions_give_the_single_sequence_logits(family, tokenizer):
    """The cache's per-row positions and masks: two rows decoded together match each decoded alone."""
    model = make_model(family, tokenizer)
    a, b = prompts_of(tokenizer, [11, 4])
    cache = BatchKVCache(model.config, 2, 32)
    with torch.inference_mode():
        for row, p in enumerate((a, b)):
            cache.plan_prefill(row, 0, len(p))
            model(torch.tensor([p]), cache=cache, positions=torch.arange(len(p)).view(1, -1))
        nxt = torch.tensor([[5], [7]])
        pos = torch.tensor([len(a), len(b)])
        cache.plan_decode(pos, len(a) + 1)
        mask = (torch.arange(len(a) + 1).view(1, -1) <= pos.view(2, 1)).view(2, 1, 1, -1)
        both, _ = model(nxt, cache=cache, positions=pos.view(2, 1), attn_mask=mask)
        for row, p in enumerate((a, b)):
            alone, _ = model(torch.tensor([p + [int(nxt[row])]]))
            torch.testing.assert_close(both[row, -1], alone[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("converted", [False, True])
def test_decode_step_computes_the_model_forward_for_one_row_and_for_several(family, converted, tokenizer):
    """`DecodeStep` writes out `GPT.forward` for one new token per row: the same logits bit for bit for a lone row
    (a `KVCache`, as generate_stream decodes), and to float rounding for rows at different positions (the batched
    engine's cache, where a converted gpt2 fuses its GELU into the oneDNN product)."""
    model = make_model(family, tokenizer)
    if converted:
        kernel = "onednn" if torch.backends.mkldnn.is_available() else "linear"
        model = convert_for_batches(convert_for_decoding(model), 3, kernel=kernel)
    step = DecodeStep(model)
    prompts = prompts_of(tokenizer, [7, 12, 3], seed=5)
    with torch.inference_mode():
        caches = [model.new_cache(1, 32) for _ in range(2)]
        for c in caches:
            model(torch.tensor([prompts[0]]), cache=c)
        for t, token in enumerate([4, 9, 2, 30]):
            ids, pos = torch.tensor([[token]]), torch.tensor([[len(prompts[0]) + t]])
            expected, _ = model(ids, cache=caches[0], last_only=True)
            assert torch.equal(step(ids, pos, caches[1]), expected)
        # three rows at positions 7, 12 and 3, decoded together: each as if alone
        cache = BatchKVCache(model.config, 3, 32)
        for row, p in enumerate(prompts):
            cache.plan_prefill(row, 0, len(p))
            model(torch.tensor([p]), cache=cache, positions=torch.arange(len(p)).view(1, -1))
        nxt = torch.tensor([[5], [7], [11]])
        pos = torch.tensor([len(p) for p in prompts])
        span = int(pos.max()) + 1
        cache.plan_decode(pos, span)
        hidden = (torch.arange(span).view(1, -1) > pos.view(3, 1)).view(3, 1, 1, span)
        mask = torch.zeros(3, 1, 1, span).masked_fill_(hidden, float("-inf"))
        both = step(nxt, pos.view(3, 1), cache, mask)
        for row, p in enumerate(prompts):
            alone, _ = model(torch.tensor([p + [int(nxt[row])]]))
            torch.testing.assert_close(both[row, -1], alone[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("onednn, linear, wins", [(1.05, 1.0, True), (0.9, 1.0, True), (1.2, 1.0, False)])
def test_several_rows_keep_onednn_unless_mkl_is_clearly_faster(onednn, linear, wins, monkeypatch):
    """A near tie timed cold goes to oneDNN (faster inside a decode step); MKL only when >10% faster."""
    import jojo.infer.batch as batch

    monkeypatch.setattr(batch, "time_turns", lambda runs, reps, before: {"onednn": onednn, "linear": linear})
    w = torch.randn(16, 8)
    assert batch._onednn_wins([(w, torch.ops.mkldnn._reorder_linear_weight(w, 2))], 2, lambda: None) is wins


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_fused_gelu_is_gpt2s_tanh_gelu():
    """The batched decode step of a gpt2 runs its first MLP product and GELU as one oneDNN kernel: GPT-2's tanh
    approximation (GeluMLP's), not the erf GELU, on activations where the two differ."""
    torch.manual_seed(0)
    w, b, x = torch.randn(64, 32), torch.randn(64), 3 * torch.randn(4, 1, 32)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
    fused = onednn_linear(x, packed, b, "gelu", "tanh")
    torch.testing.assert_close(fused, F.gelu(F.linear(x, w, b), approximate="tanh"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)


def test_seeded_sampling_and_repetition_penalty_match_single_sequence(tokenizer):
    model = make_model("llama", tokenizer)
    engine = BatchEngine(model, tokenizer, max_batch=4, prefill_chunk=64)
    prompts = prompts_of(tokenizer, [6, 13, 9], seed=3)
    configs = [
        SamplingConfig(max_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=11),
        SamplingConfig(max_tokens=20, temperature=0.0, repetition_penalty=1.5),
        SamplingConfig(max_tokens=20, temperature=1.2, top_p=0.8, seed=5),
    ]
    # alone in the engine: the very computation of generate_stream, bit for bit
    for p, sc in zip(prompts, configs):
        [res] = engine.generate_many([p], sc)
        assert res.token_ids == reference(model, tokenizer, p, sc)
    # together: each request's own generator, so the same samples whatever shares the batch
    reqs = [engine.submit(p, sc) for p, sc in zip(prompts, configs)]
    engine.run_until_done(reqs)
    for p, sc, r in zip(prompts, configs, reqs):
        assert r.tokens == reference(model, tokenizer, p, sc)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_burst_of_prompts_is_prefilled_together_and_decodes_as_each_alone(family, tokenizer):
    """Queued prompts share one prefill pass (left-padded, rows x longest chunk within `prefill_chunk`): the rest
    of a prompt cut at the last step goes first, at its own positions; a request that ends at its first token
    frees its row and the rows after it move down. Every request's tokens are its single-sequence ones."""
    model = make_model(family, tokenizer)
    engine = BatchEngine(model, tokenizer, max_batch=5, prefill_chunk=12)
    passes = []
    model.register_forward_hook(lambda m, args, out: passes.append(tuple(args[0].shape)))  # prefill only
    prompts = prompts_of(tokenizer, [2, 9, 2, 3, 4], seed=6)
    budgets = [20, 20, 1, 20, 20]  # the third ends at its first token ("length")
    reqs = [engine.submit(p, SamplingConfig(max_tokens=m, temperature=0.0)) for p, m in zip(prompts, budgets)]
    engine.step()  # 2 tokens, then 6 of the 9 (2 rows x 6 = 12): the second carries over
    assert passes == [(2, 6)] and engine._prefilling is reqs[1] and len(engine._running) == 1
    engine.step()  # the 9's last 3 at positions 6-8, the 2, the 3 and 3 of the 4 (4 rows x 3)
    assert passes[1] == (4, 3) and reqs[2].finish_reason == "length" and len(reqs[2].tokens) == 1
    assert engine._running == [reqs[0], reqs[1], reqs[3]] and [r._row for r in engine._running] == [0, 1, 2]
    assert engine._prefilling is reqs[4] and reqs[4]._row == 3  # moved down into the row the third left
    rows = [(r, r._cached, engine.cache.k[:, r._row].clone(), engine.cache.v[:, r._row].clone())
            for r in [*engine._running, engine._prefilling]]  # fmt: skip
    engine.run_until_done(reqs)
    assert passes[2] == (1, 1)
    # each row's cache holds the keys and values its tokens have alone, at their own positions
    for r, n, k, v in rows:
        alone = model.new_cache(1, n)
        with torch.inference_mode():
            model(torch.tensor([(r.prompt_ids + r.tokens)[:n]]), cache=alone)
        torch.testing.assert_close(k[:, :, :n], alone.k[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[:, :, :n], alone.v[:, 0], rtol=1e-5, atol=1e-5)
    for p, m, r in zip(prompts, budgets, reqs):
        assert r.tokens == reference(model, tokenizer, p, SamplingConfig(max_tokens=m, temperature=0.0))


def test_cancel_frees_the_row_and_the_others_continue_unchanged(tokenizer):
    model = make_model("gpt2", tokenizer)
    engine = BatchEngine(model, tokenizer, max_batch=3, prefill_chunk=4)
    prompts = prompts_of(tokenizer, [5, 8, 6, 10], seed=4)
    sc = SamplingConfig(max_tokens=30, temperature=0.0)
    reqs = [engine.submit(p, sc, stop_ids=()) for p in prompts]
    for _ in range(6):  # three running, the fourth waiting for a row
        engine.step()
    assert engine.stats()["running"] == 3
    engine.cancel(reqs[0])  # row 0: the last running row moves into it
    engine.step()
    assert reqs[0].finish_reason == "cancelled" and len(reqs[0].tokens) < 30
    engine.run_until_done(reqs)
    for p, r in zip(prompts[1:], reqs[1:]):
        assert r.tokens == reference(model, tokenizer, p, sc, stop_ids=())
    assert engine.stats()["running"] == 0
    assert engine.stats()["requests_finished"]["cancelled"] == 1


def test_cancel_while_a_prompt_is_prefilling_moves_it_down(tokenizer):
    model = make_model("llama", tokenizer)
    engine = BatchEngine(model, tokenizer, max_batch=3, prefill_chunk=4)
    sc = SamplingConfig(max_tokens=20, temperature=0.0)
    short, long_ = prompts_of(tokenizer, [3, 25], seed=8)
    a = engine.submit(short, sc, stop_ids=())
    b = engine.submit(short[:2], sc, stop_ids=())
    for _ in range(2):
        engine.step()
    c = engine.submit(long_, sc, stop_ids=())
    engine.step()  # c is half prefilled in row 2
    assert engine._prefilling is c
    engine.cancel(a)
    engine.run_until_done([a, b, c])
    assert a.finish_reason == "cancelled"
    assert b.tokens == reference(model, tokenizer, short[:2], sc, stop_ids=())
    assert c.tokens == reference(model, tokenizer, long_, sc, stop_ids=())


def test_context_limit_and_prompt_errors(tokenizer):
    model = make_model("gpt2", tokenizer, block_size=32)
    engine = BatchEngine(model, tokenizer, max_batch=2, max_queue=1, prefill_chunk=8)
    [near] = prompts_of(tokenizer, [28])
    [res] = engine.generate_many([near], SamplingConfig(max_tokens=50, temperature=0.0), stop_ids=())
    assert res.finish_reason == "length" and len(res.token_ids) == 4
    assert res.token_ids == reference(model, tokenizer, near, SamplingConfig(max_tokens=50, temperature=0.0), ())
    with pytest.raises(Exception, match="context is 32"):
        engine.submit(list(range(32)), GREEDY)
    with pytest.raises(Exception, match="empty"):
        engine.submit([], GREEDY)
    engine.submit([1, 2], GREEDY)
    with pytest.raises(QueueFull):
        engine.submit([1, 2], GREEDY)
    [zero] = engine.generate_many(["hi"], SamplingConfig(max_tokens=0, temperature=0.0))
    assert zero.finish_reason == "length" and zero.token_ids == []


def test_stop_strings_hold_back_partial_matches(tokenizer):
    model = make_model("gpt2", tokenizer)
    engine = BatchEngine(model, tokenizer)
    req = Request("r", [1], GREEDY, ("END", "xyz"), frozenset(), None)
    assert not engine._push_text(req, "abc E")
    assert req.take() == "abc "  # "E" may start END: held
    assert not engine._push_text(req, "N")
    assert req.take() == ""
    assert not engine._push_text(req, "x")
    assert req.take() == "EN" and req._stops.pending == "x"  # not END after all; but "x" may start "xyz"
    assert engine._push_text(req, "yzEND tail")  # "xyz" completes first: cut there
    assert req.take() == "" and req.text == "abc EN"


def test_stop_string_ends_generation_at_its_first_occurrence(tokenizer):
    model = make_model("gpt2", tokenizer)
    engine = BatchEngine(model, tokenizer, max_batch=2)
    prompt = tokenizer.encode("the cat and the dog")
    sc = SamplingConfig(max_tokens=30, temperature=0.0)
    [free] = engine.generate_many([prompt], sc, stop_ids=())
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    cut = text.find(stop)
    [stopped] = engine.generate_many([prompt], sc, stop=[stop], stop_ids=())
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:cut]
    # a stop string that starts to match but never completes: held back, then emitted whole
    [held] = engine.generate_many([prompt], sc, stop=[text[-2:] + "\x00"], stop_ids=())
    assert held.text == text and held.finish_reason == "length"


def test_utf8_pieces_wait_for_the_whole_character(tokenizer):
    model = make_model("gpt2", tokenizer)
    engine = BatchEngine(model, tokenizer)
    to_id = {b: tokenizer.backend.token_to_id(c) for c, b in byte_level_alphabet().items()}
    req = Request("r", [1], GREEDY, (), frozenset(), None)
    pieces = []
    for b in "aé€".encode():
        req.tokens.append(to_id[b])
        pieces.append(engine._detokenize(req))
    assert pieces == ["a", "", "é", "", "", "€"]
    req.tokens.append(to_id[0x80])  # a stray continuation byte is invalid at once: no waiting for it
    assert engine._detokenize(req) == "\ufffd"
    req.tokens += [to_id[0xE2], to_id[0x82]]  # an unfinished character at the end: shown as U+FFFD when it ends
    assert engine._detokenize(req) == ""
    assert engine._detokenize(req, final=True) == "\ufffd"
    assert "".join(pieces) + "\ufffd" * 2 == tokenizer.decode(req.tokens)


def test_text_of_a_tokenizer_without_byte_table_adds_up_too(tokenizer):
    """The fallback for tokenizers that are not byte-level: a decoded window, waiting on U+FFFD."""
    model = make_model("gpt2", tokenizer)
    engine = BatchEngine(model, tokenizer)
    assert engine._token_bytes is not None
    engine._token_bytes = None
    req = Request("r", [1], GREEDY, (), frozenset(), None)
    to_id = {b: tokenizer.backend.token_to_id(c) for c, b in byte_level_alphabet().items()}
    pieces = []
    for t in [*tokenizer.encode("the cat "), to_id[0xC3], to_id[0xA9], *tokenizer.encode(" sat")]:
        req.tokens.append(t)
        pieces.append(engine._detokenize(req))
    assert "".join(pieces) == "the cat é sat" and "" in pieces
    results = engine.generate_many(["the dog"], SamplingConfig(max_tokens=30, temperature=0.0))
    assert results[0].text == tokenizer.decode(results[0].token_ids)


def test_engine_thread_streams_and_submits_from_many_threads(tokenizer):
    model = make_model("llama", tokenizer)
    engine = BatchEngine(model, tokenizer, max_batch=4, prefill_chunk=8).start()
    try:
        prompts = prompts_of(tokenizer, [4, 12, 7, 20, 3, 9], seed=6)
        out: dict[int, tuple[list[int], str]] = {}

        def client(i: int) -> None:
            req = engine.submit(prompts[i], GREEDY)
            text = "".join(req.stream(timeout=30))
            out[i] = (req.tokens, text)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, p in enumerate(prompts):
            tokens, text = out[i]
            assert tokens == reference(model, tokenizer, p)
            assert text == tokenizer.decode(tokens)
        stats = engine.stats()
        assert stats["requests_total"] == len(prompts) and stats["generated_tokens_total"] > 0
    finally:
        engine.close()


def test_generate_many_keeps_input_order_and_records(tokenizer):
    model = make_model("gpt2", tokenizer)
    engine = BatchEngine(model, tokenizer, max_batch=2)
    texts = ["the cat", "", "a dog and a bird went", "x"]
    results = engine.generate_many(texts, SamplingConfig(max_tokens=8, temperature=0.0))
    for text, res in zip(texts, results):
        ids = tokenizer.encode(text) if text else [tokenizer.eot_id]
        assert res.token_ids == reference(model, tokenizer, ids, SamplingConfig(max_tokens=8, temperature=0.0))
        rec = res.record()
        assert rec == {
            "prompt": text,
            "completion": res.text,
            "tokens": len(res.token_ids),
            "finish_reason": res.finish_reason,
        }
