"""`jojo serve`: a checkpoint as an OpenAI-compatible HTTP service, with a chat page, on FastAPI + uvicorn.

One process. The event loop only parses, validates and streams; the model runs in the `BatchEngine`'s own
thread (continuous batching, `jojo.infer.batch`), never on the loop. A handler submits its requests to the engine
(thread-safe) with a callback that wakes it through `loop.call_soon_threadsafe`; each wake-up takes whatever text
the engine made since the last one, so a slow client gets fewer, larger chunks instead of a growing backlog.

Endpoints:
    GET  /                      the chat page (page.html: one static file, nothing from the internet)
    GET  /health                200 {"status": "ok"} when the model is loaded; 503 while loading (or if it failed)
    GET  /metrics               Prometheus text: requests, tokens, queue depth, running rows, tokens/s, TTFT
    GET  /v1/models             the one model (its id is the run's name unless --model-name)
    POST /v1/chat/completions   messages -> reply, streamed (SSE) or not
    POST /v1/completions        prompt(s) -> continuation(s), streamed or not

Errors are OpenAI's JSON: 400 for a malformed body, wrong types, out-of-range values, an unknown model (404), an
over-long prompt (code context_length_exceeded); 401 for a missing or wrong `Authorization: Bearer KEY` when a
key is set (every /v1 route; the page, /health and /metrics stay open); 413 for a body over the size limit; 429
when the engine's queue is full; 503 while the model loads. A client that disconnects (stream or not) has its
requests cancelled: the engine frees their rows at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jojo.errors import JojoError
from jojo.infer.batch import BatchEngine, QueueFull
from jojo.infer.engine import SamplingConfig
from jojo.serve.protocol import APIError, ChatRequest, CompletionRequest, error_body, parse, usage
from jojo.tokenizer import encode_chat

log = logging.getLogger("jojo.serve")
PAGE_FILE = Path(__file__).with_name("page.html")


@dataclass
class ServeSettings:
    checkpoint: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    threads: int | None = None
    cors_origins: tuple[str, ...] = ()
    device: str = "auto"
    model_name: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the context minus one (room for one new token)
    max_tokens_limit: int | None = None  # None: the context
    max_n: int = 8
    prefill_chunk: int = 512  # prompt tokens per engine step, padded (see BatchEngine._prefill)
    stream_interval: float = 0.02  # seconds between two chunks of one streamed response (0: every token)
    stream_chunk_rate: float = 80.0  # chunks a second, all streams together, before each is paced slower (0: no cap)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or self.prefill_chunk < 1:
            raise JojoError("--max-batch, --max-queue and --prefill-chunk must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise JojoError("--threads must be >= 1")
        if self.stream_interval < 0 or self.stream_chunk_rate < 0:
            raise JojoError("--stream-interval and --stream-chunk-rate must be >= 0")
        if not 0 < self.port < 65536:
            raise JojoError(f"--port {self.port} is not a TCP port (1-65535)")


def model_id_for(checkpoint: str) -> str:
    """The name clients use for the model: the run directory's name (a checkpoint's parent when it is step-N)."""
    from jojo.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(checkpoint).resolve()
    return path.parent.name if path.name.startswith("step-") else path.name


class ServerState:
    """The engine (None while loading), the model's name and the HTTP counters."""

    def __init__(self, settings: ServeSettings, engine: BatchEngine | None = None, model_id: str | None = None):
        self.settings = settings
        self.engine = engine
        self.error: str | None = None
        self.model_id = (
            model_id or settings.model_name or (model_id_for(settings.checkpoint) if settings.checkpoint else "jojo")
        )
        self.created = int(time.time())
        self.http_status: Counter[int] = Counter()
        self.streaming = 0  # streamed responses sending text now (event loop only): the total chunk rate's share

    def load(self) -> None:
        """Load the checkpoint and start the engine (in a thread of its own: /health answers 503 meanwhile)."""
        import torch

        from jojo.checkpoint import load_checkpoint
        from jojo.device import pick_device

        s = self.settings
        try:
            if s.threads:
                torch.set_num_threads(s.threads)
            model, tok, _ = load_checkpoint(s.checkpoint, pick_device(s.device))
            self.engine = BatchEngine(model, tok, s.max_batch, s.max_queue, s.prefill_chunk).start()
            log.info("jojo serve: model %s ready (context %d)", self.model_id, model.config.block_size)
        except Exception as exc:  # reported by /health and every request; the process keeps answering
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, JojoError) else str(exc)
            log.error("jojo serve: loading %s failed: %s", s.checkpoint, self.error)

    def ready(self) -> BatchEngine:
        if self.engine is None:
            if self.error:
                raise APIError(503, f"the model failed to load: {self.error}", "server_error")
            raise APIError(503, "the model is loading; retry in a moment", "server_error", headers={"Retry-After": "2"})
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class _CountStatus:
    """Pure ASGI middleware counting responses by status (for /metrics); it does not buffer streamed bodies."""

    def __init__(self, app, counts: Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


class _Waker:
    """Wakes a handler from the engine's thread, at most once per wait.

    The engine calls it after every token of every request; it schedules a wake-up on the loop only while the
    handler is waiting for one (armed), so the tokens made while the handler sends, or paces its chunks, cost a
    flag check. `wait(ready)` checks `ready()` and arms under one lock: a token pushed in between is never missed.
    `wait(..., done_only=True)` wakes for finished requests only (a non-streamed reply, or a stream's pause)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.event = asyncio.Event()
        self._armed = False
        self._armed_for_done = False  # this wait wants finished requests only
        self._lock = threading.Lock()

    def __call__(self, req=None) -> None:  # engine thread
        news_only = req is not None and not req.done
        with self._lock:
            if not self._armed or (self._armed_for_done and news_only):
                return
            self._armed = False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, ready, timeout: float | None = None, done_only: bool = False) -> None:
        """Return at once if ready(), else at the next wake-up (or a disconnect: the watcher sets the event), or
        after `timeout` seconds. done_only: wake for a finished request only, not for new text."""
        with self._lock:
            if ready():
                return
            self.event.clear()
            self._armed, self._armed_for_done = True, done_only
        timer = None if timeout is None else self.loop.call_later(timeout, self.event.set)  # cheaper than wait_for
        try:
            await self.event.wait()
        finally:
            if timer is not None:
                timer.cancel()


async def _watch_disconnect(request: Request, engine: BatchEngine, reqs: list, waker: _Waker) -> None:
    """Cancel `reqs` when the client goes away (the body is read already: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for r in reqs:
                engine.cancel(r)
            waker.event.set()
            return


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over the {limit}-byte limit", param=None, code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over the {limit}-byte limit", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def create_app(settings: ServeSettings, engine: BatchEngine | None = None, model_id: str | None = None) -> FastAPI:
    """The FastAPI app. With `engine` it serves that engine at once (tests, embedding); without, it loads
    `settings.checkpoint` in a background thread when it starts (/health answers 503 until then)."""
    state = ServerState(settings, engine, model_id)
    page = PAGE_FILE.read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            threading.Thread(target=state.load, name="jojo-serve-load", daemon=True).start()
        else:
            state.engine.start()
        yield
        state.close()

    app = FastAPI(title="jojo serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jojo = state
    _install_middleware_and_errors(app, state)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if state.engine is not None:
            return {"status": "ok", "model": state.model_id}
        status = "error" if state.error else "loading"
        return JSONResponse({"status": status, "error": state.error}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(state), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        _check_key(settings, request)
        return {"object": "list", "data": [_model_object(state)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        _check_key(settings, request)
        _check_model(state, name)
        return _model_object(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(state, request, chat=False)

    return app


def _install_middleware_and_errors(app: FastAPI, state: ServerState) -> None:
    """Status counting, CORS (only for --cors-origin) and OpenAI-style JSON for every error."""
    app.add_middleware(_CountStatus, counts=state.http_status)
    if state.settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = "unknown endpoint" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(f"{message}: {request.method} {request.url.path}"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def _check_key(settings: ServeSettings, request: Request) -> None:
    key = settings.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "no API key: send the header 'Authorization: Bearer KEY'", code="missing_api_key")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_id:
        raise APIError(
            404,
            f"the model '{name}' does not exist; this server has '{state.model_id}'",
            param="model",
            code="model_not_found",
        )


def _model_object(state: ServerState) -> dict:
    obj = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "jojo"}
    if state.engine is not None:
        obj["max_model_len"] = state.engine.block  # an extension (vLLM's name): the context in tokens
    return obj


async def _complete(state: ServerState, request: Request, chat: bool):
    """POST /v1/chat/completions or /v1/completions: validate, submit every choice to the engine, then stream
    the text (SSE) or wait for all of it."""
    settings = state.settings
    _check_key(settings, request)
    engine = state.ready()
    body = parse(ChatRequest if chat else CompletionRequest, await _read_json(request, settings.max_body_bytes))
    _check_model(state, body.model)
    if not 1 <= body.n <= settings.max_n:
        raise APIError(400, f"n must be between 1 and {settings.max_n}", param="n")
    stops = body.stop_list()
    prompts, stop_ids = await _encode_prompts(engine, body, chat)
    wanted, limit = _check_lengths(settings, engine, body, prompts, "messages" if chat else "prompt")
    waker = _Waker(asyncio.get_running_loop())
    reqs = []
    try:
        for ids in prompts:
            for j in range(body.n):
                sc = SamplingConfig(
                    max_tokens=wanted if wanted is not None else min(limit, engine.block - len(ids)),
                    temperature=body.temperature,
                    top_k=body.top_k,
                    top_p=body.top_p,
                    repetition_penalty=body.repetition_penalty,
                    seed=None if body.seed is None else body.seed + j,  # n choices: n different samples
                )
                reqs.append(engine.submit(ids, sc, stops, stop_ids, on_update=waker))
    except QueueFull as exc:
        for r in reqs:
            engine.cancel(r)
        raise APIError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    meta = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": state.model_id,
    }
    prompt_tokens = sum(len(ids) for ids in prompts)
    if body.stream:
        events = _stream(request, state, reqs, waker, chat, meta, prompt_tokens, body.include_usage())
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    await _wait_all(request, engine, reqs, waker)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": None} for i, r in enumerate(reqs)]  # fmt: skip
    else:
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(reqs)]  # fmt: skip
    return {
        **meta,
        "object": "chat.completion" if chat else "text_completion",
        "choices": choices,
        "usage": usage(prompt_tokens, sum(len(r.tokens) for r in reqs)),
    }


INLINE_ENCODE_CHARS = 4000  # shorter prompts are encoded on the event loop (well under a millisecond)


async def _encode_prompts(engine: BatchEngine, body, chat: bool) -> tuple[list[list[int]], frozenset]:
    """The prompts' token ids and the token ids that end a choice. A long prompt is encoded in a worker thread
    so the event loop keeps serving; a short one on the loop itself, since the hop to a worker and back cost
    2-16 ms (a tenth of a lone request's time to first token) while the engine's thread held the GIL."""
    tok = engine.tok
    if chat:
        messages = body.chat_messages()
        size = sum(len(m["content"]) for m in messages)
        encode = lambda: [encode_chat(tok, messages, add_generation_prompt=True)[0]]  # noqa: E731
        stop_ids = engine.chat_stop_ids
    else:
        texts = body.prompts()
        size = sum(len(t) for t in texts)
        encode = lambda: [tok.encode(t) if t else [tok.eot_id] for t in texts]  # noqa: E731
        stop_ids = engine.text_stop_ids
    prompts = encode() if size <= INLINE_ENCODE_CHARS else await run_in_threadpool(encode)
    return prompts, frozenset() if body.ignore_eos else stop_ids


def _check_lengths(settings: ServeSettings, engine: BatchEngine, body, prompts, param: str) -> tuple[int | None, int]:
    """Refuse an over-long prompt or an out-of-range max_tokens; returns (the tokens asked for, the limit)."""
    max_prompt = min(settings.max_prompt_tokens or engine.block, engine.block - 1)  # room for one new token
    limit = settings.max_tokens_limit or engine.block
    for ids in prompts:
        if len(ids) > max_prompt:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens; this server takes at most {max_prompt} (the model's "
                f"context is {engine.block})",
                param=param,
                code="context_length_exceeded",
            )
    wanted = body.wanted_tokens()
    if wanted is not None and not 1 <= wanted <= limit:
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise APIError(400, f"{name} must be between 1 and {limit}", param=name)
    return wanted, limit


async def _wait_all(request: Request, engine: BatchEngine, reqs: list, waker: _Waker) -> None:
    """A non-streamed reply: wait until every choice is done (cancelled if the client hangs up first)."""
    watcher = asyncio.create_task(_watch_disconnect(request, engine, reqs, waker))
    try:
        while not all(r.done for r in reqs):
            await waker.wait(lambda: all(r.done for r in reqs), done_only=True)
    finally:
        watcher.cancel()
        for r in reqs:
            if not r.done:
                engine.cancel(r)
    failed = next((r for r in reqs if r.finish_reason == "error"), None)
    if failed is not None:
        raise APIError(500, f"generation failed: {failed.error}", "server_error")


async def _stream(
    request: Request,
    state: ServerState,
    reqs: list,
    waker: _Waker,
    chat: bool,
    meta: dict,
    prompt_tokens: int,
    include_usage: bool,
):
    """Server-sent events: a chunk per choice with the text made since the last one, at most one every
    `--stream-interval` seconds per response (the first at once), or every k / `--stream-chunk-rate` seconds while
    k streamed responses are sending text (all of them together send at most that many writes a second; a
    response counts from its first text to its end, so neither queued nor non-streamed requests slow a stream);
    a last chunk with its finish_reason, the usage chunk when stream_options.include_usage, then [DONE].

    Why pace: a chunk costs the server ~0.1 ms of Python and the client as much again, per chunk, on the same
    cores as the model; at 8 streams of ~150 tokens/s that was a third of the throughput on 2 cores. 20 ms (50
    updates a second) still reads as smooth streaming, and a pace of 0 sends every token. Why a total rate: at
    20 ms each, 8 streams' chunks still cost 6-9% of their throughput on 2 cores, 80 a second (each of the 8
    every 100 ms, still 10 updates a second) 0-3% (BENCHMARKS.md)."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({**meta, "object": obj, "choices": [choice], **extra})

    engine, interval, rate = state.engine, state.settings.stream_interval, state.settings.stream_chunk_rate
    watcher = asyncio.create_task(_watch_disconnect(request, engine, reqs, waker))
    counted = False  # whether this response is in state.streaming
    try:
        if chat:
            for i in range(len(reqs)):
                yield chunk(i, None, None, first=True)
        open_ = set(range(len(reqs)))
        last_sent = 0.0
        while open_:
            pace = max(interval, max(state.streaming, 1) / rate) if rate > 0 else interval
            if pace > 0:  # pace the chunks; a choice's end cuts the pause short
                pause = last_sent + pace - time.perf_counter()
                if pause > 0:
                    await waker.wait(lambda: any(reqs[i].done for i in open_), timeout=pause, done_only=True)
            # after a pause there is usually text waiting: one wake-up per chunk, the timer's
            await waker.wait(lambda: any(reqs[i].has_news() for i in open_))
            last_sent = time.perf_counter()
            out = []  # everything ready now goes out in one write
            for i in sorted(open_):
                r = reqs[i]
                done = r.done  # read before take: once done, every piece is in the buffer
                piece = r.take()
                if piece:
                    out.append(chunk(i, piece, None))
                if done:
                    if r.finish_reason == "error":
                        yield "".join(out) + _sse(error_body(f"generation failed: {r.error}", "server_error"))
                        return
                    if r.finish_reason == "cancelled":
                        return
                    out.append(chunk(i, None, r.finish_reason))
                    open_.discard(i)
            if out:
                if not counted:
                    state.streaming, counted = state.streaming + 1, True
                yield "".join(out)
        if include_usage:
            total = usage(prompt_tokens, sum(len(r.tokens) for r in reqs))
            yield _sse({**meta, "object": obj, "choices": [], "usage": total})
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        if counted:
            state.streaming -= 1
        for r in reqs:
            if not r.done:
                engine.cancel(r)


def _prometheus(state: ServerState) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP jojo_{name} {help_}")
        lines.append(f"# TYPE jojo_{name} {kind}")
        lines.extend(f"jojo_{name}{labels} {value:g}" for labels, value in samples)

    metric("up", "gauge", "1 when the model is loaded and serving", [("", 1.0 if state.engine else 0.0)])
    metric(
        "http_responses_total",
        "counter",
        "HTTP responses by status",
        [(f'{{status="{code}"}}', n) for code, n in sorted(state.http_status.items())],
    )
    if state.engine is not None:
        s = state.engine.stats()
        metric(
            "requests_total", "counter", "generation requests submitted (one per choice)", [("", s["requests_total"])]
        )
        metric(
            "requests_finished_total",
            "counter",
            "generation requests finished, by reason",
            [(f'{{reason="{k}"}}', v) for k, v in s["requests_finished"].items()],
        )
        metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [("", s["prompt_tokens_total"])])
        metric(
            "generated_tokens_total",
            "counter",
            "tokens sampled (stop tokens included)",
            [("", s["generated_tokens_total"])],
        )
        metric("queue_depth", "gauge", "requests waiting for a row", [("", s["queue_depth"])])
        metric("running_requests", "gauge", "requests holding a row (decoding or prefilling)", [("", s["running"])])
        metric("max_batch", "gauge", "rows of the batch", [("", s["max_batch"])])
        metric(
            "tokens_per_second",
            "gauge",
            "tokens generated per second over the last 10 s",
            [("", s["tokens_per_second"])],
        )
        metric(
            "time_to_first_token_seconds_avg",
            "gauge",
            "mean time from submission to the first token",
            [("", s["time_to_first_token_avg_s"])],
        )
    return "\n".join(lines) + "\n"


def serve(settings: ServeSettings) -> None:
    """Run the server until Ctrl+C (`jojo serve`)."""
    import uvicorn

    app = create_app(settings)
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(
        f"jojo serve: {app.state.jojo.model_id} on http://{shown}:{settings.port}/ (chat page at /, API at /v1)",
        flush=True,
    )
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print("jojo serve: warning: listening beyond this machine without --api-key", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=3)
