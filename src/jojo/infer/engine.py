"""Generation: sampling and a KV-cached decode loop that streams tokens as they come.

The prompt is run once (prefill) into a `KVCache`; each new token then costs one forward pass over a single
position. `use_cache=False` recomputes the whole sequence each step (nanoGPT's way): the tests use it to prove
the cached path gives the same tokens, and the benchmark uses it as the floor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from jojo.errors import JojoError
from jojo.infer.decode import DecodeStep
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
    pos = torch.arange(cfg.block_size, device=device).view(1, -1)
    budget = min(sc.max_tokens, cfg.block_size - n)
    cache = model.new_cache(1, cfg.block_size) if use_cache else None
    # the decode forward as the batched engine runs it for a lone row (a stand-in model: its own forward)
    step = DecodeStep(model) if isinstance(model, GPT) and use_cache else None
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
        if step is not None:
            logits = step(buf[:, n - 1 : n], pos[:, n - 1 : n], cache)
        elif use_cache:
            logits, _ = model(buf[:, n - 1 : n], cache=cache, last_only=True)
        else:
            logits, _ = model(buf[:, :n], last_only=True)


def generate(model: GPT, prompt_ids: list[int], sc: SamplingConfig, vocab_limit: int, **kwargs) -> list[int]:
    return list(generate_stream(model, prompt_ids, sc, vocab_limit, **kwargs))


class StopMatcher:
    """Cuts a stream of text at the first of several stop strings, holding back a tail that may be the start of
    one (so a stop string split across tokens is never shown). `push(piece)` returns the text safe to show;
    `done` turns True at a stop; `flush()` returns what was held back when the stream ends without a stop."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.done = False

    def push(self, piece: str) -> str:
        if self.done:
            return ""
        if not self.stops:
            return piece
        text = self.pending + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.done, self.pending = True, ""
            return text[:cut]
        keep = 0  # the longest tail of text that is a proper prefix of a stop string
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if stop.startswith(text[-n:]):
                    keep = n
                    break
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.pending = ("" if self.done else self.pending), ""
        return out


class TextGenerator:
    """A model and its tokenizer, ready to generate text: the one place that knows the vocabulary limit (padding
    ids above the tokenizer are never sampled), the stop ids, how a prompt starts, and seeded generators.
    `jojo generate`, `jojo chat`, the training monitor's samples and the Python API (`jojo.LM`) all go through it.

    A text prompt starts with <|endoftext|>, as every pretraining document does; a chat prompt is the ChatML
    rendering of the messages (`jojo.tokenizer.encode_chat`), and its answer stops at <|im_end|>."""

    def __init__(self, model: GPT, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.wte.weight.device
        self.vocab_limit = tokenizer.vocab_size
        self.text_stops = {tokenizer.eot_id}
        self.chat_stops = {tokenizer.im_end_id, tokenizer.eot_id}

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.tokenizer.eot_id] + (self.tokenizer.encode(prompt) if prompt else [])

    def chat_ids(self, messages: list[dict]) -> list[int]:
        from jojo.tokenizer import encode_chat

        return encode_chat(self.tokenizer, messages, add_generation_prompt=True)[0]

    def generator(self, seed: int | None) -> torch.Generator | None:
        return torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None

    def stream_ids(
        self, ids: list[int], sc: SamplingConfig, chat: bool = False, generator=None, nonstop: bool = False
    ) -> Iterator[int]:
        """Token ids of the continuation. `nonstop` goes on past the context: when it is full, the oldest half is
        dropped and decoding continues from the newest half (re-prefilled), until max_tokens or a stop id."""
        stops = self.chat_stops if chat else self.text_stops
        if not nonstop:
            yield from generate_stream(self.model, ids, sc, self.vocab_limit, stops, generator=generator)
            return
        block, context, left = self.model.config.block_size, list(ids), sc.max_tokens
        first = True
        while left > 0:
            window = context if first and len(context) < block else context[-(block // 2) :]
            first = False
            room = block - len(window)
            n = 0
            part = dataclasses.replace(sc, max_tokens=min(left, room))
            for token in generate_stream(self.model, window, part, self.vocab_limit, stops, generator=generator):
                n += 1
                context.append(token)
                yield token
            left -= n
            if n < min(part.max_tokens, room):  # a stop id ended it, not the context
                return

    def stream(
        self,
        ids: list[int],
        sc: SamplingConfig,
        stop: list[str] | tuple[str, ...] = (),
        chat: bool = False,
        generator=None,
        info: dict | None = None,
        nonstop: bool = False,
    ) -> Iterator[str]:
        """Text pieces as they are decoded (UTF-8 sequences and stop-string prefixes held back until whole).
        `info`, when given, receives the token count and finish reason (stop | length) at the end."""
        streamer, matcher = TextStreamer(self.tokenizer), StopMatcher(stop)
        if generator is None:
            generator = self.generator(sc.seed)
        reason = "length"
        budget = sc.max_tokens if nonstop else min(sc.max_tokens, self.model.config.block_size - len(ids))
        for token in self.stream_ids(ids, sc, chat, generator, nonstop):
            out = matcher.push(streamer.push(token))
            if out:
                yield out
            if matcher.done:
                reason = "stop"
                break
        else:
            if len(streamer.ids) < budget:
                reason = "stop"  # a stop id ended it
            tail = matcher.push(streamer.flush())
            tail += matcher.flush()
            if tail:
                yield tail
        if info is not None:
            info.update(tokens=len(streamer.ids), finish_reason=reason)

    def text(self, ids: list[int], sc: SamplingConfig, **kwargs) -> str:
        return "".join(self.stream(ids, sc, **kwargs))


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
