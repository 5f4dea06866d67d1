"""Batched generation with continuous batching: many requests share one model, each at its own position.

`BatchEngine` holds up to `max_batch` sequences in one `BatchKVCache` (one row each) and advances them together:
every step (1) admits queued requests into free rows and prefills their prompts, several in one forward pass (a
left-padded [k, T] chunk, k x T at most `prefill_chunk` tokens), then (2) decodes one token for every running row
in a single forward pass over [rows, 1]. A request joins between two steps and leaves when it is done (stop id,
stop string, max tokens, full context, or cancelled), and its row goes to the next one: continuous batching. A
long prompt is cut into chunks, so the running streams wait at most one chunk per step, never the whole prompt;
a burst of short prompts is one pass, not one pass each (each pass reads every weight once).

Per-row positions. Row b stores its keys at its own positions 0..p_b; a decode step feeds each row's last token at
position p_b (RoPE angles or the learned position table read at p_b) and masks row b's attention to keys
0..p_b of the S = max_b(p_b) + 1 that the cache returns: mask[b, 0, 0, s] = (s <= p_b).

Sampling is per request (`SamplingConfig`: temperature, top-k, top-p, repetition penalty, seed, max tokens),
through the same `process_logits`/`pick` as the single-sequence `generate_stream`, with a `torch.Generator` per
request (seeded with `seed`, so a request's sample depends on its prompt and seed, not on its neighbours, up to
the float rounding discussed below).
Text streams as pieces: an incomplete UTF-8 character is held back until its last byte arrives, and so is a
tail that could be the start of a stop string (a stop string ends the request, itself not part of the text).

Exactness at temperature 0. A request alone in the engine runs exactly the computation of `generate_stream`
(the same shapes and kernels: a prompt of at most `prefill_chunk` tokens is one causal prefill, a lone row
decodes through the one-row kernels of `jojo.infer.decode`), so its tokens are identical bit for bit (a longer
prompt is prefilled in chunks: the same up to rounding, as below). In a batch (prompts prefilled together, rows
decoded together), the matrix products run over several rows and attention over a masked, padded span: the
logits then differ from the single-row ones by float rounding (~1e-6 relative; the tests bound it), so the greedy
tokens are the same unless two logits tie to within rounding. The tests check the tokens on both families with
mixed prompt lengths and arrival times.

Speed on CPU: the engine converts the model with `convert_for_decoding` (one-row kernels, for a lone row) and
`convert_for_batches` (oneDNN on prepacked weights for several rows: batched steps and prompt chunks, where
faster than MKL); both leave the architecture alone and make the model inference-only. Several rows decoding
together attend through `jojo.infer.native.decode_attention()` (a C loop built at first use, each row to its own
length, no mask) where it builds, else through SDPA with the mask above. The KV cache holds max_batch x context
positions.

How to call it:

    from jojo.checkpoint import load_checkpoint
    from jojo.infer.batch import BatchEngine
    from jojo.infer.engine import SamplingConfig

    model, tok, _ = load_checkpoint("runs/x", "cpu")
    engine = BatchEngine(model, tok, max_batch=8)          # converts the model for fast CPU decoding

    # Batch use (`LM.generate([...])`, `jojo generate --prompt-file`): results in input order, every prompt
    # through the batch; prompts are strings (encoded with tok.encode; "" starts a fresh document) or id lists.
    results = engine.generate_many(["Once upon", "The cat"], SamplingConfig(max_tokens=50, temperature=0))
    for r in results:
        r.record()   # {"prompt", "completion", "tokens", "finish_reason"}: one line of results.jsonl

    # Chat prompts: ids = encode_chat(tok, messages, add_generation_prompt=True)[0], with stop_ids=engine.chat_stop_ids
    [r] = engine.generate_many([ids], sc, stop_ids=engine.chat_stop_ids)

    # Streaming from a thread of your own, or from a server (thread-safe submit/cancel; the engine's thread runs
    # the steps). `on_update` is called from the engine's thread after new text or the end: keep it short.
    engine.start()
    req = engine.submit(ids, sc, stop=["\\n\\n"], stop_ids=engine.chat_stop_ids)
    for piece in req.stream():   # blocks; or req.take() (non-blocking) after an on_update
        print(piece, end="")
    req.finish_reason            # "stop" | "length" | "cancelled" | "error"
    engine.close()

Without `start()`, `generate_many` (and `run_until_done`) drive the steps in the caller's thread.
"""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jojo.errors import JojoError
from jojo.infer.decode import (
    DecodeLinear,
    DecodeStep,
    DecodeSwiGLU,
    convert_for_decoding,
    evictor,
    onednn_linear,
    time_turns,
)
from jojo.infer.engine import SamplingConfig, StopMatcher, pick, process_logits
from jojo.infer.native import decode_attention
from jojo.model import GPT
from jojo.tokenizer import byte_level_alphabet

FINISH_REASONS = ("stop", "length", "cancelled", "error")
log = logging.getLogger("jojo.infer.batch")


class QueueFull(JojoError):
    """The engine's queue holds `max_queue` waiting requests already; try again later."""


class BatchKVCache:
    """Keys and values of up to `rows` sequences, each row filled from position 0 at its own pace.

    The engine plans each forward pass before running it: `plan_prefill(row, start, T)` for a chunk of one row's
    prompt at positions start..start+T-1, or `plan_decode(positions)` for one token in each of rows 0..B-1, row b
    at positions[b]. `GPT.forward` then calls `store(layer, k, v)` per layer, which writes the new keys where
    the plan says and returns the keys the new tokens attend to (a view, no copy): the prompt row's 0..start+T-1,
    or rows 0..B-1 over 0..max(positions) (the caller masks each row's stale tail). Running rows always occupy
    rows 0..B-1 (the engine moves a row down when one below it leaves), so a decode step is one slice."""

    def __init__(self, cfg, rows: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, rows, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)
        # the same storage as rows of head_dim, [rows * n_kv_head * max_len, head_dim]: a decode step writes its new
        # keys with one index_copy_ (2.5x faster than scatter_ with an expanded index at 8 rows)
        self._k_flat = [t.view(-1, cfg.head_dim) for t in self._k_layers]
        self._v_flat = [t.view(-1, cfg.head_dim) for t in self._v_layers]
        self.rows, self.max_len = rows, max_len
        self._plan: tuple = ()

    def plan_prefill(self, row: int, start: int, length: int) -> None:
        if start + length > self.max_len:
            raise ValueError(f"KV cache overflow: {start + length} positions > max_len {self.max_len}")
        self._plan = ("prefill", row, start, length)

    def plan_rows(self, row: int, starts: list[int], lengths: list[int], width: int) -> None:
        """Chunks of k prompts in one pass, in rows row..row+k-1: row+b gets lengths[b] keys at positions
        starts[b].., which arrive right-aligned in a chunk `width` wide (left padding; the padding is not kept)."""
        end = max(s + n for s, n in zip(starts, lengths))
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self._plan = ("rows", row, starts, lengths, width, end)

    def plan_decode(self, positions: torch.Tensor, span: int, stores: bool = True) -> None:
        """positions: [B] (long, on the cache's device), the position of each row's new token; span = max + 1.
        stores False: the new keys are written by the caller (`decode_rows`), not by `store`, which needs no index."""
        B = positions.shape[0]
        index = None
        if stores:
            kv, length = self.k.shape[2], self.max_len
            # flat row of (row b, head h, position positions[b]) = (b * kv + h) * max_len + positions[b]
            heads = torch.arange(B * kv, device=positions.device).view(B, kv)
            index = (heads * length + positions.view(B, 1)).reshape(-1)
        self._plan = ("decode", B, index, span)

    def advance(self, n: int) -> None:
        """Called by `GPT.forward` after every layer stored its keys; the engine keeps the positions itself."""
        self._plan = ()

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self._plan[0]
        if kind == "prefill":
            _, row, start, T = self._plan
            k_all = self._k_layers[layer].narrow(0, row, 1)
            v_all = self._v_layers[layer].narrow(0, row, 1)
            k_all.narrow(2, start, T).copy_(k)
            v_all.narrow(2, start, T).copy_(v)
            return k_all.narrow(2, 0, start + T), v_all.narrow(2, 0, start + T)
        if kind == "rows":
            _, row, starts, lengths, width, end = self._plan
            k_all = self._k_layers[layer].narrow(0, row, len(starts))
            v_all = self._v_layers[layer].narrow(0, row, len(starts))
            for b, (s, n) in enumerate(zip(starts, lengths)):
                k_all[b, :, s : s + n].copy_(k[b, :, width - n :])
                v_all[b, :, s : s + n].copy_(v[b, :, width - n :])
            return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)
        _, B, index, span = self._plan
        d = k.shape[-1]
        self._k_flat[layer].index_copy_(0, index, k.reshape(-1, d))
        self._v_flat[layer].index_copy_(0, index, v.reshape(-1, d))
        k_all = self._k_layers[layer].narrow(0, 0, B)
        v_all = self._v_layers[layer].narrow(0, 0, B)
        return k_all.narrow(2, 0, span), v_all.narrow(2, 0, span)

    def decode_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The planned decode step's keys and values of `layer`, rows 0..B-1 over positions 0..span-1, without
        storing anything: for a caller that writes the new ones itself (`jojo.infer.native.decode_attention`)."""
        _, B, _, span = self._plan
        k_all = self._k_layers[layer].narrow(0, 0, B)
        v_all = self._v_layers[layer].narrow(0, 0, B)
        return k_all.narrow(2, 0, span), v_all.narrow(2, 0, span)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst (every layer)."""
        if length:
            self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
            self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])


class Request:
    """One generation in the engine: a handle the caller keeps (thread-safe to read through its methods).

    Outputs: `tokens` (generated ids, stop id excluded), `text` (the text emitted so far: the concatenation of
    the pieces, a stop string and what follows it cut off), `finish_reason` once `done`. Pieces not yet consumed
    wait in a buffer: `take()` returns and clears them without blocking, `stream()` yields them as they come."""

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        sampling: SamplingConfig,
        stop: tuple[str, ...],
        stop_ids: frozenset[int],
        on_update: Callable[[Request], None] | None,
    ):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.stop = stop
        self.stop_ids = stop_ids
        self.on_update = on_update
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self._text: list[str] = []
        self._cancelled = False
        # engine-side state (touched by the engine's step only)
        self._row = -1
        self._prefilled = 0  # prompt tokens already in the cache
        self._cached = 0  # positions stored in the cache
        self._next = -1  # the last sampled token: the input of the next decode step
        self._ctx: torch.Tensor | None = None  # prompt + generated ids, for the repetition penalty
        self._generator: torch.Generator | None = None
        self._budget = 0
        self._prefix_off = 0  # detokenization window: ids[_prefix_off:_read_off] were turned into text already
        self._read_off = 0
        self._utf8 = None  # the incremental UTF-8 decoder (byte-level tokenizers)
        self._stops = StopMatcher(stop)  # holds back text that may be the start of a stop string

    # ---- caller side -------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self._text)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def has_news(self) -> bool:
        """Text not yet taken, or the end."""
        return bool(self._pieces) or self.finish_reason is not None

    def take(self) -> str:
        """The text emitted since the last take (non-blocking)."""
        with self._cond:
            out = "".join(self._pieces)
            self._pieces.clear()
            return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request is done (True) or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.finish_reason is not None, timeout)

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Yield text pieces as the engine makes them, until the request is done (needs the engine's thread
        running, or another thread driving its steps). Raises TimeoutError after `timeout` s without news."""
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pieces or self.finish_reason is not None, timeout):
                    raise TimeoutError(f"request {self.id}: nothing new in {timeout} s")
                piece = "".join(self._pieces)
                self._pieces.clear()
                finished = self.finish_reason is not None
            if piece:
                yield piece
            if finished:
                return

    # ---- engine side -------------------------------------------------------------------------------------
    def _emit(self, piece: str) -> None:
        if piece:
            with self._cond:
                self._pieces.append(piece)
                self._text.append(piece)
                self._cond.notify_all()

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            self.finish_reason = reason
            self.error = error
            self.finished_at = time.perf_counter()
            self._cond.notify_all()


@dataclass
class Result:
    """A finished request, as `generate_many` returns it."""

    prompt: str | None  # the prompt text (None when the prompt was given as ids)
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def record(self) -> dict:
        """One line of `jojo generate --prompt-file ... --output results.jsonl`."""
        return {
            "prompt": self.prompt,
            "completion": self.text,
            "tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
        }


def _several_rows(x: torch.Tensor) -> bool:
    """More than one token's row: a batched decode step [B, 1, C] or a prompt chunk [1, T, C] (not a lone row)."""
    return x.dim() >= 2 and x.numel() != x.shape[-1]


class BatchDecodeLinear(DecodeLinear):
    """A `DecodeLinear` that multiplies several rows (a batched decode step, a prompt chunk) by a oneDNN-packed copy
    of the weight; a lone row goes the `DecodeLinear` way. `generate_stream` on the same converted model computes
    what a request alone in the engine computes."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and _several_rows(x):
            return onednn_linear(x, self.packed, self.bias)
        return super().forward(x)


class BatchDecodeSwiGLU(DecodeSwiGLU):
    """`DecodeSwiGLU` with its side-by-side gate and up weights packed for oneDNN, for several rows."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or not _several_rows(x):
            return super().forward(x)
        gate, up = onednn_linear(x, self.packed, self.bias).view(*x.shape[:-1], 2, -1).unbind(-2)
        return self.proj(F.silu(gate) * up)


def _onednn_wins(pairs: list[tuple[torch.Tensor, torch.Tensor]], rows: int, evict) -> bool:
    """Whether oneDNN on the packed copies beats `F.linear` for `rows` rows, timed on all the (weight, packed)
    pairs of one shape in turn, each pass after `evict()`: as a decode step finds them (timed warm on one weight,
    MKL won 1536x384 in a process started alone: 6 of the 25 products of its 8-row steps took 81 us, not ~45).

    Within 10%, oneDNN: timed cold, gpt2's 384x384 attention output came out a tie (MKL ahead by 2-3% at every
    load), but inside the 8-row decode step, where part of the weights is still in the cache, MKL took 84 us a
    call and oneDNN about half: the step was 5% faster with oneDNN (BENCHMARKS.md, session 9)."""
    x = torch.randn(rows, 1, pairs[0][0].shape[1])
    runs = {
        "onednn": lambda: [onednn_linear(x, packed, None) for _, packed in pairs],
        "linear": lambda: [F.linear(x, weight) for weight, _ in pairs],
    }
    with torch.inference_mode():
        times = time_turns(runs, reps=9, before=evict)
    return times["onednn"] < 1.1 * times["linear"]


def convert_for_batches(model: GPT, rows: int, kernel: str = "auto") -> GPT:
    """Give the matrix products of several rows (batched decode steps [rows, 1, C], prompt chunks [1, T, C])
    oneDNN kernels on prepacked weights, where that is faster than `F.linear` on this machine (timed once per
    weight shape for a decode step of `rows` rows, on all the model's weights of that shape in turn after reading
    the rest of the model, as `convert_for_decoding` times; kernel "onednn" or "linear" forces one for every shape).

    Why: on CPU, `F.linear` goes to MKL's sgemm, which on the 2-core AMD EPYC of BENCHMARKS.md runs a [8, 384] x
    [384, 1536] product at ~60 GFLOP/s and gains nothing from a second thread; oneDNN with the weight reordered
    once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) reaches 120-180 GFLOP/s, so a decode
    step of 8 rows costs about half, and a prompt chunk of 16-64 tokens 1.9-2.5x less. The packed copy is a
    second copy of each converted weight (memory: the model's matrices once more). Applies to models converted
    by `convert_for_decoding` (float32 on CPU) with oneDNN available; others are returned unchanged. Idempotent;
    returns the model."""
    if getattr(model, "decode_kernels", None) is None or getattr(model, "batch_kernels", None) is not None:
        return model
    if not torch.backends.mkldnn.is_available():
        model.batch_kernels = {}
        return model
    with torch.no_grad():
        parts = []  # (module, its weight [out, in], its batched class, the packed copy)
        for module in model.modules():
            if isinstance(module, DecodeSwiGLU) and not isinstance(module, BatchDecodeSwiGLU):
                weight = module.wt.t()  # [2 * hidden, in], the gate and up rows side by side
                parts.append((module, weight, BatchDecodeSwiGLU))
            elif type(module) is DecodeLinear:
                parts.append((module, module.weight.detach(), BatchDecodeLinear))
        parts = [(m, w, cls, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)) for m, w, cls in parts]
        shapes: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for _, weight, _, packed in parts:
            shapes.setdefault(tuple(weight.shape), []).append((weight, packed))
        if kernel == "auto":
            evict = evictor(model)
            chosen = {shape: _onednn_wins(pairs, rows, evict) for shape, pairs in shapes.items()}
        else:
            chosen = dict.fromkeys(shapes, kernel == "onednn")
        for module, weight, cls, packed in parts:
            module.__class__ = cls  # a subclass adding one branch: parameters stay as they are
            module.packed = packed if chosen[tuple(weight.shape)] else None
    model.batch_kernels = {f"{o}x{i}": "onednn" if w else "linear" for (o, i), w in chosen.items()}
    return model


def _token_bytes(tok) -> list[bytes] | None:
    """The raw bytes of every token id of a byte-level BPE (None for another kind of tokenizer). Added tokens
    (<|endoftext|>, <|im_start|>, <|im_end|>) are their text, as `decode` writes them."""
    backend = tok.backend
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return None
    alphabet = byte_level_alphabet()
    table: list[bytes] = [b""] * backend.get_vocab_size(with_added_tokens=True)
    for piece, idx in backend.get_vocab(with_added_tokens=True).items():
        if idx >= len(table):
            return None
        if all(c in alphabet for c in piece):
            table[idx] = bytes(alphabet[c] for c in piece)
        else:
            table[idx] = piece.encode()
    return table


class BatchEngine:
    """Continuous batching over one model (see the module docstring). Thread-safe: `submit`, `cancel`, `stats`
    from any thread; the steps run in the engine's own thread after `start()`, or in the caller's through
    `generate_many`/`run_until_done` when it is not started."""

    def __init__(
        self,
        model: GPT,
        tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        convert: bool = True,
    ):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise JojoError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model = convert_for_batches(convert_for_decoding(model), max_batch) if convert else model
        self.model.eval()
        p = model.wte.weight
        # several rows' attention in C where it builds (jojo.infer.native), else PyTorch's with a mask
        self._attend = decode_attention() if p.device.type == "cpu" and p.dtype == torch.float32 else None
        self._decode_step = DecodeStep(self.model, self._attend)  # a decode step without the module machinery
        self.tok = tokenizer
        self.cfg = model.config
        self.block = self.cfg.block_size
        self.vocab_limit = min(tokenizer.vocab_size, self.cfg.vocab_size)  # padded embedding rows never sampled
        self.chat_stop_ids = frozenset({tokenizer.im_end_id, tokenizer.eot_id})
        self.text_stop_ids = frozenset({tokenizer.eot_id})
        self._token_bytes = _token_bytes(tokenizer)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.device = p.device
        self.cache = BatchKVCache(self.cfg, max_batch, self.block, p.device, p.dtype)
        self._arange = torch.arange(self.block, device=self.device)
        self._lock = threading.Condition()  # guards the queue, the counters and the thread's wake-ups
        self._queue: deque[Request] = deque()
        self._running: list[Request] = []  # row i holds _running[i] (engine thread only)
        self._prefilling: Request | None = None  # at most one, in row len(_running)
        self._step_lock = threading.Lock()  # one driver of the steps at a time
        self._thread: threading.Thread | None = None
        self._closing = False
        self.last_step_s = 0.0
        self._ids = itertools.count(1)
        # counters (under _lock)
        self.requests_total = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.steps_total = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self._ttft_sum = 0.0
        self._ttft_n = 0

    # ---- submitting ------------------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig,
        stop: Iterable[str] = (),
        stop_ids: Iterable[int] | None = None,
        on_update: Callable[[Request], None] | None = None,
        *,
        force: bool = False,
    ) -> Request:
        """Queue a generation; returns its `Request`. stop_ids: ids that end it unseen (default: <|endoftext|>;
        `chat_stop_ids` for chat). Raises JojoError for an empty or too long prompt, QueueFull when
        `max_queue` requests wait already (`force` skips that limit, for batch use)."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise JojoError("the prompt is empty; give some text")
        if len(ids) >= self.block:
            raise JojoError(
                f"the prompt is {len(ids)} tokens but the model's context is {self.block}; shorten the prompt"
            )
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
            raise JojoError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        stops = tuple(s for s in stop if s)
        req = Request(
            f"req-{next(self._ids)}",
            ids,
            sampling,
            stops,
            frozenset(self.text_stop_ids if stop_ids is None else stop_ids),
            on_update,
        )
        with self._lock:
            if self._closing:
                raise JojoError("the engine is closed")
            if not force and len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(req)
            self.requests_total += 1
            self._lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request: its row is freed at the engine's next step (thread-safe; a no-op once done)."""
        with self._lock:
            req._cancelled = True
            self._lock.notify_all()

    # ---- the engine's thread ---------------------------------------------------------------------------------
    def start(self) -> BatchEngine:
        """Run the steps in a daemon thread of the engine's own until `close()`.

        Speed: PyTorch's CPU builds use GNU OpenMP, which makes its worker threads stop spinning between parallel
        regions (each op then waits ~50 us to wake them) once two threads of the process have run parallel ops
        and both still live: a step here then took ~1.5x as long (BENCHMARKS.md). So load and convert the model
        in a thread that ends once the engine has started (as `jojo serve` does), or drive the steps from the
        thread that loaded it (`generate_many`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jojo-batch-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; requests not finished end as cancelled."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._step_lock:
            for req in [*self._running, *([self._prefilling] if self._prefilling else []), *self._queue]:
                self._end(req, "cancelled")
            self._running, self._prefilling = [], None
            self._queue.clear()

    def _has_work(self) -> bool:
        return bool(self._queue or self._running or self._prefilling)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closing or self._has_work())
                if self._closing:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug must not kill the server's only engine: fail what runs, keep going
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _fail_all(self, message: str) -> None:
        log.exception("engine step failed: %s", message)
        with self._step_lock:
            for req in [*self._running, *([self._prefilling] if self._prefilling else [])]:
                self._end(req, "error", message)
            self._running, self._prefilling = [], None

    # ---- synchronous use -------------------------------------------------------------------------------------
    def run_until_done(self, requests: Iterable[Request]) -> None:
        """Drive the steps in this thread until `requests` are done (or wait for them if the engine's thread runs)."""
        requests = list(requests)
        if self._thread is not None:
            for r in requests:
                r.wait()
            return
        while not all(r.done for r in requests):
            self.step()

    def generate_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: SamplingConfig,
        stop: Iterable[str] = (),
        stop_ids: Iterable[int] | None = None,
    ) -> list[Result]:
        """Generate for every prompt through the batch; results in input order. A string prompt is encoded with
        the tokenizer ("" starts a fresh document: <|endoftext|>); a list is taken as token ids. Every prompt
        gets `sampling` as is (the same seed each: a prompt's sample does not depend on the others)."""
        stop = tuple(stop)
        encoded = []
        for p in prompts:
            if isinstance(p, str):
                encoded.append(self.tok.encode(p) if p else [self.tok.eot_id])
            else:
                encoded.append(list(p))
        reqs = [self.submit(ids, sampling, stop, stop_ids, force=True) for ids in encoded]
        self.run_until_done(reqs)
        return [
            Result(
                p if isinstance(p, str) else None, r.text, list(r.tokens), r.finish_reason or "error", len(r.prompt_ids)
            )
            for p, r in zip(prompts, reqs)
        ]

    # ---- one step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, admit and prefill up to `prefill_chunk` prompt tokens, decode one token in
        every running row."""
        with self._step_lock:
            t0 = time.perf_counter()
            self._drop_cancelled()
            produced = self._prefill()
            if self._running:
                produced += self._decode()
            with self._lock:
                self.steps_total += 1
                self.generated_tokens_total += produced
                now = time.perf_counter()
                self._recent.append((now, produced))
                while self._recent and now - self._recent[0][0] > 10.0:
                    self._recent.popleft()
            self.last_step_s = time.perf_counter() - t0

    def _drop_cancelled(self) -> None:
        with self._lock:
            queued = [r for r in self._queue if r._cancelled]
            for r in queued:
                self._queue.remove(r)
        for r in queued:
            self._end(r, "cancelled")
        i = 0
        while i < len(self._running):
            if self._running[i]._cancelled:
                self._leave(i, "cancelled")
            else:
                i += 1
        if self._prefilling is not None and self._prefilling._cancelled:
            self._end(self._prefilling, "cancelled")
            self._prefilling = None

    def _admit(self, row: int) -> Request | None:
        """Take the first queued request into `row`; None if it ended at once (no room for a single token)."""
        with self._lock:
            req = self._queue.popleft()
        sc = req.sampling
        req._row = row
        req._budget = min(sc.max_tokens, self.block - len(req.prompt_ids))
        if sc.temperature > 0:
            seed = sc.seed if sc.seed is not None else secrets.randbits(63)
            req._generator = torch.Generator(device=self.device).manual_seed(seed)
        if sc.repetition_penalty != 1.0:
            req._ctx = torch.empty(1, self.block, dtype=torch.long, device=self.device)
            req._ctx[0, : len(req.prompt_ids)] = torch.tensor(req.prompt_ids)
        with self._lock:
            self.prompt_tokens_total += len(req.prompt_ids)
        if req._budget <= 0:
            self._end(req, "length")
            return None
        return req

    def _prefill(self) -> int:
        """Prefill prompt chunks in one forward pass and sample the first token of every prompt completed; returns
        how many were sampled.

        The chunks come from the prompt the last step left half done (if any), then from queued requests taken
        into the free rows after the running ones, in order, while the padded chunk (rows x its longest chunk)
        stays within `prefill_chunk` tokens: a burst of short prompts is one pass, not one pass each, and a long
        prompt is cut so that running rows wait at most one chunk per step. Only the last of the chunks can be
        part of a prompt; it carries over to the next step."""
        group: list[tuple[Request, int]] = []  # (request, chunk length), in rows len(_running), +1, ...
        width = 0
        while True:
            k = len(group)
            if k == 0 and self._prefilling is not None:
                req = self._prefilling
            else:
                with self._lock:
                    req = self._queue[0] if self._queue else None
                if req is None or len(self._running) + k >= self.max_batch:
                    break
            rest = len(req.prompt_ids) - req._prefilled
            wide = max(width, min(rest, self.prefill_chunk // (k + 1)))
            if wide == 0 or (k + 1) * wide > self.prefill_chunk:
                break
            if req is not self._prefilling and self._admit(len(self._running) + k) is None:
                continue  # it ended at once: the next one
            group.append((req, min(rest, wide)))
            width = wide
        if not group:
            return 0
        logits = self._prefill_one(*group[0]) if len(group) == 1 else self._prefill_rows(group, width)
        done = []
        for b, (req, n) in enumerate(group):
            req._prefilled += n
            req._cached = req._prefilled
            if req._prefilled == len(req.prompt_ids):
                done.append(b)
        last = group[-1][0]
        self._prefilling = last if last._prefilled < len(last.prompt_ids) else None
        picked = self._sample_rows(logits[done, -1], [group[b][0] for b in done]) if done else []
        for b, token in zip(done, picked):
            req = group[b][0]
            if self._accept(req, token):
                self._to_row(req, len(self._running))
                self._running.append(req)
        if self._prefilling is not None:
            self._to_row(self._prefilling, len(self._running))
        return len(done)

    def _prefill_one(self, req: Request, n: int) -> torch.Tensor:
        """The next n prompt tokens of one request: from position 0 plain causal attention (mask None: the exact
        computation of generate_stream's prefill); a later chunk sees all of the row's earlier keys and is causal
        within itself."""
        start = req._prefilled
        idx = torch.tensor([req.prompt_ids[start : start + n]], device=self.device)
        self.cache.plan_prefill(req._row, start, n)
        positions = self._arange[start : start + n].view(1, n)
        mask = None
        if start > 0:
            mask = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(diagonal=start)
            mask = mask.view(1, 1, n, start + n)
        logits, _ = self.model(idx, cache=self.cache, positions=positions, attn_mask=mask, last_only=True)
        return logits

    def _prefill_rows(self, group: list[tuple[Request, int]], width: int) -> torch.Tensor:
        """Chunks of several requests (rows len(_running)..) as one [k, width] pass, each chunk right-aligned (left
        padding), so the last column holds every row's last token. Column t of row b sits at position
        start_b + t - (width - n_b) and sees the row's keys up to there; padding columns (clamped to position >= 0)
        see at least key 0 and are neither stored nor read."""
        k = len(group)
        idx = torch.zeros(k, width, dtype=torch.long)
        for b, (req, n) in enumerate(group):
            idx[b, width - n :] = torch.tensor(req.prompt_ids[req._prefilled : req._prefilled + n])
        offsets = torch.tensor([req._prefilled - (width - n) for req, n in group], device=self.device)
        positions = (self._arange[:width].view(1, width) + offsets.view(k, 1)).clamp_(min=0)
        starts = [req._prefilled for req, _ in group]
        lengths = [n for _, n in group]
        span = max(s + n for s, n in zip(starts, lengths))
        mask = (self._arange[:span].view(1, 1, span) <= positions.view(k, width, 1)).view(k, 1, width, span)
        self.cache.plan_rows(len(self._running), starts, lengths, width)
        logits, _ = self.model(
            idx.to(self.device), cache=self.cache, positions=positions, attn_mask=mask, last_only=True
        )
        return logits

    def _to_row(self, req: Request, row: int) -> None:
        """Move a request's cached positions down to `row` (a row freed by a request that ended at its first
        token), keeping the rows in use contiguous."""
        if req._row != row:
            self.cache.move(req._row, row, req._cached)
            req._row = row

    def _decode(self) -> int:
        rows = self._running
        B = len(rows)
        tokens = torch.tensor([[r._next] for r in rows], device=self.device)
        pos_list = [r._cached for r in rows]
        pos = torch.tensor(pos_list, device=self.device)
        span = max(pos_list) + 1
        # One row: the same writes as generate_stream's KVCache and no mask, its whole cache is visible (its decode
        # step, bit for bit). Several: each row's length for the C attention (which writes the new keys itself), or
        # an additive mask (0 where row b may look, -inf past its position), made once here rather than converted
        # from a boolean one by every layer's attention (the same numbers: SDPA turns a boolean mask into this).
        mask = lengths = None
        if B == 1:
            self.cache.plan_prefill(0, pos_list[0], 1)
        elif self._attend is not None:
            self.cache.plan_decode(pos, span, stores=False)
            lengths = pos + 1
        else:
            self.cache.plan_decode(pos, span)
            hidden = (self._arange[:span].view(1, span) > pos.view(B, 1)).view(B, 1, 1, span)
            mask = torch.zeros(B, 1, 1, span, dtype=self.cache.k.dtype, device=self.device)
            mask.masked_fill_(hidden, float("-inf"))
        logits = self._decode_step(tokens, pos.view(B, 1), self.cache, mask, lengths)
        for r in rows:
            r._cached += 1
        picked = self._sample_rows(logits[:, -1], rows)
        ended = [r for r, token in zip(list(rows), picked) if not self._accept(r, token)]
        for r in ended:  # rows move when one leaves: find each by its current row
            self._leave(r._row, None)
        return B

    def _sample_rows(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """logits [B, V] of `rows` -> one token each. Greedy rows without penalties take one argmax together."""
        out: list[int | None] = [None] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.sampling.temperature == 0 and r.sampling.repetition_penalty == 1]
        if greedy:
            sub = logits if len(greedy) == len(rows) else logits[greedy]
            for i, t in zip(greedy, sub[:, : self.vocab_limit].argmax(dim=-1).tolist()):
                out[i] = t
        for i, r in enumerate(rows):
            if out[i] is None:
                n = len(r.prompt_ids) + len(r.tokens)
                ctx = r._ctx[:, :n] if r._ctx is not None else logits.new_empty(1, 0, dtype=torch.long)
                filtered = process_logits(logits[i : i + 1], ctx, r.sampling, self.vocab_limit)
                out[i] = int(pick(filtered, r.sampling, r._generator))
        return out  # type: ignore[return-value]

    def _accept(self, req: Request, token: int) -> bool:
        """Take a sampled token into the request: emit its text, end it if done. True if it keeps running."""
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
            with self._lock:
                self._ttft_sum += req.first_token_at - req.submitted_at
                self._ttft_n += 1
        if req._cancelled:
            self._end(req, "cancelled")
            return False
        if token in req.stop_ids:
            self._end(req, "stop", flush=True)
            return False
        n = len(req.prompt_ids) + len(req.tokens)
        req.tokens.append(token)
        if req._ctx is not None:
            req._ctx[0, n] = token
        req._next = token
        if self._push_text(req, self._detokenize(req)):
            self._end(req, "stop")
            return False
        if len(req.tokens) >= req._budget or n + 1 >= self.block:
            self._end(req, "length", flush=True)
            return False
        self._notify(req)
        return True

    def _detokenize(self, req: Request, final: bool = False) -> str:
        """The text of the tokens not yet turned into text, holding back an incomplete UTF-8 character.

        Byte-level tokenizers (Jojo's, GPT-2's, Llama 3's): the tokens' raw bytes go through an incremental UTF-8
        decoder, which holds back at most the 3 bytes of an unfinished character and turns invalid bytes into
        U+FFFD at once; the pieces then add up to `tok.decode(tokens)` exactly. Other tokenizers: decode a short
        window (the ids from the previous piece on, so a tokenizer that needs context, e.g. for a leading space,
        has it) and wait while its text ends in U+FFFD, for at most 8 tokens."""
        ids = req.tokens
        if self._token_bytes is not None:
            if req._utf8 is None:
                req._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            new = b"".join(self._token_bytes[t] for t in ids[req._read_off :])
            req._read_off = len(ids)
            return req._utf8.decode(new, final)
        prefix = self.tok.decode(ids[req._prefix_off : req._read_off])
        text = self.tok.decode(ids[req._prefix_off :])
        waiting = text.endswith("\ufffd") and len(ids) - req._read_off < 8 or len(text) <= len(prefix)
        if waiting and not final:
            return ""
        req._prefix_off, req._read_off = req._read_off, len(ids)
        return text[len(prefix) :]

    def _push_text(self, req: Request, piece: str) -> bool:
        """Emit `piece` unless it completes a stop string (emit up to it; True) or may start one (held back)."""
        req._emit(req._stops.push(piece))
        return req._stops.done

    def _end(self, req: Request, reason: str, error: str | None = None, flush: bool = False) -> None:
        """Finish `req`. flush (a stop id or the length limit ended it): first emit what was held back, the last
        tokens' text (an incomplete character shows as U+FFFD) and a tail that did not become a stop string."""
        if req.done:
            return
        if flush:
            tail = self._detokenize(req, final=True)
            if self._push_text(req, tail):
                reason = "stop"  # the flushed text completed a stop string
            else:
                req._emit(req._stops.flush())
        req._finish(reason, error)
        with self._lock:
            self.finished[reason] += 1
        self._notify(req)

    def _leave(self, i: int, reason: str | None) -> None:
        """Remove running row i (ended with `reason` unless already ended): the last running row moves into it, and
        a prompt being prefilled moves down one row behind it, so the running rows stay 0..B-1."""
        req = self._running[i]
        if reason is not None:
            self._end(req, reason)
        last = len(self._running) - 1
        if i != last:
            moved = self._running[last]
            self.cache.move(last, i, moved._cached)
            moved._row = i
            self._running[i] = moved
        self._running.pop()
        if self._prefilling is not None:
            self.cache.move(last + 1, last, self._prefilling._prefilled)
            self._prefilling._row = last

    @staticmethod
    def _notify(req: Request) -> None:
        if req.on_update is not None:
            req.on_update(req)

    # ---- numbers ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters for /metrics: requests, tokens, queue depth, running rows, tokens/s over the last 10 s."""
        with self._lock:
            now = time.perf_counter()
            recent = [(t, n) for t, n in self._recent if now - t <= 10.0]
            span = now - recent[0][0] if recent else 0.0
            rate = sum(n for _, n in recent) / span if span > 0 else 0.0
            return {
                "requests_total": self.requests_total,
                "requests_finished": dict(self.finished),
                "prompt_tokens_total": self.prompt_tokens_total,
                "generated_tokens_total": self.generated_tokens_total,
                "steps_total": self.steps_total,
                "queue_depth": len(self._queue),
                "running": len(self._running) + (self._prefilling is not None),
                "max_batch": self.max_batch,
                "tokens_per_second": rate,
                "time_to_first_token_avg_s": self._ttft_sum / self._ttft_n if self._ttft_n else 0.0,
            }
