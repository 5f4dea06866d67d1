"""Generation quality and speed.

Functions the rest of Jojo calls:

- `generation_quality(model, tokenizer, *, prompts=PROMPTS, max_tokens=64, temperature=0.8, top_k=50,
  seed=0) -> dict`: the samples, distinct-2, distinct-3 and the repetition rate.
- `generation_speed(model, *, prompt_tokens=None, new_tokens=64, repeats=3) -> dict`: prefill tokens/s, decode
  tokens/s, time to first token and peak memory, on the model's device, through the engine every command uses
  (`jojo.infer.engine.generate_stream`, KV cache).

Formulas (words = whitespace-separated pieces of each sample's generated text, the prompt left out):

    distinct-n      = |distinct n-grams over all samples| / |n-grams over all samples|    (Li et al., 2016)
    repetition rate = |4-grams of a sample that already occurred earlier in the same sample| / |4-grams|,
                      pooled over the samples (0 = no phrase repeats; degenerate loops approach 1)

Speed: prefill = one forward of `prompt_tokens` tokens into an empty KV cache; decode = greedy tokens after it,
timed from the first decoded token to the last (min of `repeats` runs each, after a warm-up); time to first
token = prefill plus choosing the first token. Peak memory: on CUDA the allocator's peak during the runs
(`torch.cuda.max_memory_allocated`); elsewhere the process's peak resident memory (ru_maxrss), which also
counts everything else the process holds.
"""

from __future__ import annotations

import sys
import time

import torch

from jojo.infer.engine import SamplingConfig, generate, generate_stream
from jojo.tokenizer import Tokenizer

PROMPTS = (
    "Once upon a time",
    "The best way to learn something new is",
    "In the morning, the little town",
    "Scientists have discovered that",
    "My favourite food is",
)


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(texts: list[str], n: int = 4) -> float:
    repeated = total = 0
    for text in texts:
        seen = set()
        for g in ngrams(text.split(), n):
            total += 1
            repeated += g in seen
            seen.add(g)
    return repeated / total if total else float("nan")


@torch.inference_mode()
def generation_quality(
    model,
    tokenizer: Tokenizer,
    *,
    prompts=PROMPTS,
    max_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> dict:
    """Sample one continuation per prompt (seeded) and measure its diversity (see the module docstring)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sc = SamplingConfig(max_tokens=max_tokens, temperature=temperature, top_k=top_k)
    was_training = model.training
    model.eval()
    samples = []
    try:
        for prompt in prompts:
            ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
            out = generate(model, ids, sc, tokenizer.vocab_size, stop_ids={tokenizer.eot_id}, generator=generator)
            samples.append({"prompt": prompt, "text": tokenizer.decode(out), "tokens": len(out)})
    finally:
        model.train(was_training)
    texts = [s["text"] for s in samples]
    return {
        "samples": samples,
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "repetition_rate": repetition_rate(texts),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocator peak"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return peak * scale / 2**20, "process peak resident memory"


@torch.inference_mode()
def generation_speed(model, *, prompt_tokens: int | None = None, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Prefill and decode speed of the KV-cached engine on the model's device (see the module docstring)."""
    cfg = model.config
    device = next(model.parameters()).device
    prompt_tokens = prompt_tokens or max(cfg.block_size // 2, 1)
    prompt_tokens = min(prompt_tokens, cfg.block_size - 2)
    new_tokens = max(min(new_tokens, cfg.block_size - prompt_tokens - 1), 1)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=g).tolist()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.eval()
    sc = SamplingConfig(max_tokens=new_tokens, temperature=0.0)
    prefill, ttft, decode = [], [], []
    try:
        for r in range(repeats + 1):
            idx = torch.tensor([prompt], device=device)
            cache = model.new_cache(1, prompt_tokens)
            _sync(device)
            t0 = time.perf_counter()
            model(idx, cache=cache, last_only=True)
            _sync(device)
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            stream = generate_stream(model, prompt, sc, cfg.vocab_size)
            next(stream)
            t_first = time.perf_counter() - t0
            t1 = time.perf_counter()
            n = sum(1 for _ in stream)
            _sync(device)
            t_rest = time.perf_counter() - t1
            if r:  # run 0 warms up kernels and allocations
                prefill.append(t_prefill)
                ttft.append(t_first)
                if n:
                    decode.append(n / t_rest)
    finally:
        model.train(was_training)
    memory, memory_kind = _peak_memory_mb(device)
    return {
        "device": str(device),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_tokens_per_second": prompt_tokens / min(prefill),
        "decode_tokens_per_second": max(decode) if decode else float("nan"),
        "time_to_first_token_ms": 1000 * min(ttft),
        "peak_memory_mb": memory,
        "peak_memory_kind": memory_kind,
    }
