"""Generation: sampling and a KV-cached decode loop that streams tokens as they come.

The prompt is run once (prefill) into a `KVCache`; each new token then costs one forward pass over a single
position. `use_cache=False` recomputes the whole sequence each step (nanoGPT's way): the tests use it to prove
the cached path gives the same tokens, and the benchmark uses it as the floor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from jojo.errors import JojoError
from jojo.model import GPT


@dataclass
class SamplingConfig:
    max_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the context (CTRL paper)
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 0:
            raise JojoError("--max-tokens must be >= 0")
        if self.temperature < 0:
            raise JojoError("--temperature must be >= 0")
        if self.top_k < 0:
            raise JojoError("--top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise JojoError("--top-p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise JojoError("--repetition-penalty must be > 0")


def process_logits(logits: torch.Tensor, context: torch.Tensor, sc: SamplingConfig, vocab_limit: int) -> torch.Tensor:
    """logits [B, V] -> filtered logits (float32) for sampling; ids >= vocab_limit (padding) never win."""
    logits = logits.float().clone()
    if vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if sc.repetition_penalty != 1.0 and context.numel():
        seen = torch.gather(logits, 1, context)
        seen = torch.where(seen > 0, seen / sc.repetition_penalty, seen * sc.repetition_penalty)
        logits.scatter_(1, context, seen)
    if sc.temperature == 0:
        return logits
    logits = logits / sc.temperature
    if sc.top_k and sc.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sc.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sc.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (keep at least one)
        drop = probs.cumsum(-1) - probs > sc.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def pick(logits: torch.Tensor, sc: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if sc.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.inference_mode()  # cheaper than no_grad: no version counters or view tracking on the decode hot path
def generate_stream(
    model: GPT,
    prompt_ids: list[int],
    sc: SamplingConfig,
    vocab_limit: int,
    stop_ids: set[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time until max_tokens, a stop id (not yielded) or the context is full."""
    cfg = model.config
    if not prompt_ids:
        raise JojoError("the prompt is empty; give some text")
    if len(prompt_ids) >= cfg.block_size:
        raise JojoError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {cfg.block_size}; shorten the prompt"
        )
    device = model.wte.weight.device
    if generator is None and sc.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sc.seed)
    stop_ids = stop_ids or set()
    # Greedy without penalties needs only the argmax over real tokens (padding ids >= vocab_limit never count):
    # the same token process_logits + pick would choose, without copying the logits every step.
    greedy = sc.temperature == 0 and sc.repetition_penalty == 1.0
    n = len(prompt_ids)
    buf = torch.empty(1, cfg.block_size, dtype=torch.long, device=device)  # the context, filled in place
    buf[0, :n] = torch.tensor(prompt_ids, dtype=torch.long)
    budget = min(sc.max_tokens, cfg.block_size - n)
    cache = model.new_cache(1, cfg.block_size) if use_cache else None
    logits, _ = model(buf[:, :n], cache=cache, last_only=True)
    for _ in range(budget):
        if greedy:
            nxt = logits[:, -1, :vocab_limit].argmax(dim=-1, keepdim=True)
        else:
            nxt = pick(process_logits(logits[:, -1], buf[:, :n], sc, vocab_limit), sc, generator)
        token = int(nxt)
        if token in stop_ids:
            return
        yield token
        buf[:, n] = nxt[:, 0]
        n += 1
        if n >= cfg.block_size:
            return
        if use_cache:
            logits, _ = model(buf[:, n - 1 : n], cache=cache, last_only=True)
        else:
            logits, _ = model(buf[:, :n], last_only=True)


def generate(model: GPT, prompt_ids: list[int], sc: SamplingConfig, vocab_limit: int, **kwargs) -> list[int]:
    return list(generate_stream(model, prompt_ids, sc, vocab_limit, **kwargs))


class TextStreamer:
    """Turns a stream of token ids into printable text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        piece = text[self.printed :]
        self.printed = len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[self.printed :]
        self.printed = len(text)
        return piece
