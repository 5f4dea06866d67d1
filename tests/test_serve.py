"""`jojo serve` against the official `openai` client on 127.0.0.1: streaming and not, usage, finish reasons, auth,
16 concurrent streams, OpenAI-style 4xx errors, disconnects, limits, /health, /metrics, CORS; and the chat page in
headless Chromium (skipped when no chromium is installed: `apt-get install chromium`, `pip install playwright`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from conftest import tiny_model_config  # noqa: E402
from jojo.checkpoint import load_checkpoint, write_checkpoint  # noqa: E402
from jojo.infer.batch import BatchEngine  # noqa: E402
from jojo.model import GPT  # noqa: E402
from jojo.serve.app import ServeSettings, create_app  # noqa: E402

KEY = "sk-test-jojo"
MODEL = "tiny-chat"


class Recorder:
    """ASGI wrapper keeping the JSON body of every chat request the server received (for the page test)."""

    def __init__(self, app):
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        parts: list[bytes] = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    try:
                        self.bodies.append(json.loads(b"".join(parts)))
                    except ValueError:
                        self.bodies.append(None)
            return message

        return await self.app(scope, recording_receive, send)


@contextlib.contextmanager
def slow_steps(engine: BatchEngine, delay: float):
    """Each engine step takes at least `delay` seconds more (to make streams observably long)."""
    real = engine.step

    def step():
        time.sleep(delay)
        real()

    engine.step = step  # the engine's thread looks the method up at every step
    try:
        yield
    finally:
        del engine.step


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(3)
    model = GPT(tiny_model_config("llama", vocab_size=tokenizer.vocab_size, block_size=256))
    return write_checkpoint(tmp_path_factory.mktemp("serve") / MODEL, 0, model, tokenizer, {})


@pytest.fixture(scope="module")
def server(ckpt):
    model, tok, _ = load_checkpoint(ckpt)
    engine = BatchEngine(model, tok, max_batch=8, max_queue=64, prefill_chunk=16)
    settings = ServeSettings(checkpoint=str(ckpt), api_key=KEY, max_n=4, max_body_bytes=64_000)
    app = create_app(settings, engine=engine)
    recorder = Recorder(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(recorder, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, base=url + "/v1", engine=engine, recorder=recorder, tok=tok)
    srv.should_exit = True
    thread.join(10)


def client(server, key: str = KEY):
    return openai.OpenAI(base_url=server.base, api_key=key, max_retries=0, timeout=60)


def metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_stream_and_non_stream_give_the_same_text_and_the_usage_chunk_arrives(server):
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about cats."}]
    full = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
    assert full.object == "chat.completion" and full.model == MODEL and full.id.startswith("chatcmpl-")
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({ch.id for ch in chunks}) == 1 and all(ch.model == MODEL and ch.created for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        full.choices[0].finish_reason
    ]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == full.usage.model_dump()
    assert full.usage.prompt_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + 30

    plain = c.completions.create(model=MODEL, prompt="The cat sat", temperature=0, max_tokens=20)
    pieces = list(c.completions.create(model=MODEL, prompt="The cat sat", temperature=0, max_tokens=20, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == plain.choices[0].text
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 20


def test_prompts_encoded_in_a_worker_thread_give_the_same_replies(server, monkeypatch):
    """Long prompts are encoded off the event loop, short ones on it: the same token ids either way."""
    import jojo.serve.app as app_module

    c = client(server)
    messages = [{"role": "user", "content": "Tell me about dogs."}]
    args = dict(model=MODEL, temperature=0, max_tokens=12)
    inline = (c.chat.completions.create(messages=messages, **args), c.completions.create(prompt="Once", **args))
    monkeypatch.setattr(app_module, "INLINE_ENCODE_CHARS", 0)
    threaded = (c.chat.completions.create(messages=messages, **args), c.completions.create(prompt="Once", **args))
    assert inline[0].choices[0].message.content == threaded[0].choices[0].message.content
    assert inline[1].choices[0].text == threaded[1].choices[0].text
    assert inline[0].usage.prompt_tokens == threaded[0].usage.prompt_tokens


def test_stop_and_max_tokens_end_with_the_right_finish_reason(server):
    c = client(server)
    prompt = "Once upon a time"
    free = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 12
    text = free.choices[0].text
    stop = text[4:7]
    stopped = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stop=[stop, "\x00zz"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.find(stop)]
    streamed = list(
        c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stop=stop, stream=True)
    )
    assert "".join(p.choices[0].text for p in streamed) == stopped.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"
    nulls = httpx.post(
        server.base + "/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "top_p": None,
            "n": None,
            "stop": None,
            "seed": None,
            "stream": None,
        },
    )
    assert nulls.status_code == 200 and nulls.json()["choices"][0]["text"] == text  # null = the default
    newer = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_completion_tokens=5
    )
    assert newer.choices[0].finish_reason == "length" and newer.usage.completion_tokens == 5


def test_n_choices_and_seeds(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="A dog", max_tokens=15, temperature=1.0, n=3, seed=42)
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # the same seed: the same samples
    assert len({ch.text for ch in a.choices}) > 1  # choice j samples with seed + j
    two = c.completions.create(model=MODEL, prompt=["A dog", "A cat"], max_tokens=5, temperature=0)
    assert len(two.choices) == 2 and two.choices[0].text != two.choices[1].text


def test_models_health_metrics_and_the_page(server):
    c = client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": MODEL}
    m = metrics(server)
    for name in (
        "jojo_requests_total",
        "jojo_generated_tokens_total",
        "jojo_queue_depth",
        "jojo_tokens_per_second",
        "jojo_running_requests",
    ):
        assert name in m
    page = httpx.get(server.url + "/")
    assert (
        page.status_code == 200
        and "/v1/chat/completions" in page.text
        and "http" not in page.text.split("<script>")[0].replace("http-equiv", "")
    )


def test_wrong_or_missing_key_is_refused(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    r = httpx.post(server.base + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_sixteen_concurrent_streams_each_equal_their_single_request_output(server):
    c = client(server)
    prompts = [f"Story {i}: " + "the cat and the dog " * (i % 5) + "went" for i in range(16)]
    single = [
        c.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=24).choices[0].text for p in prompts
    ]

    async def run() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=server.base, api_key=KEY, max_retries=0, timeout=120)

        async def one(p: str, delay: float) -> str:
            await asyncio.sleep(delay)  # arrivals spread over the decoding of the others
            stream = await ac.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=24, stream=True)
            return "".join([ch.choices[0].text async for ch in stream if ch.choices])

        try:
            return await asyncio.gather(*(one(p, 0.01 * (i % 4)) for i, p in enumerate(prompts)))
        finally:
            await ac.close()

    assert asyncio.run(run()) == single


@pytest.mark.parametrize(
    "body, param",
    [
        (b'{"messages": [{"role": "user", "content": "hi"}', None),  # malformed JSON
        (b"[1, 2]", None),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, "model"),
        ({"messages": [{"role": "user", "content": "hi " * 400}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi " * 2000}]}, "messages"),  # encoded in a worker thread
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 50}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.base + "/chat/completions", content=data, headers=headers)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param
    ok = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_the_openai_client_raises_its_own_error_types(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model=MODEL, prompt="word " * 300)
    assert info.value.code == "context_length_exceeded"


def test_limits_on_body_size_and_unknown_routes(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    r = httpx.post(server.base + "/chat/completions", json=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(server.base + "/nothing", headers=headers)
    assert r.status_code == 404 and "error" in r.json()


def test_a_client_that_hangs_up_frees_its_row(server):
    engine = server.engine
    with slow_steps(engine, 0.01):  # ~100 tokens/s: the stream is still running when the client leaves
        before = engine.stats()["requests_finished"]["cancelled"]
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream(
            "POST", server.base + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: {") for line in got)
        # the connection is closed: the engine drops the request at its next step
        deadline = time.time() + 10
        while time.time() < deadline:
            s = engine.stats()
            if s["requests_finished"]["cancelled"] > before and s["running"] == 0:
                break
            time.sleep(0.02)
        s = engine.stats()
        assert s["requests_finished"]["cancelled"] == before + 1 and s["running"] == 0
        assert metrics(server)['jojo_requests_finished_total{reason="cancelled"}'] == before + 1


def _asgi_client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_health_is_503_while_loading_then_ok(ckpt):
    app = create_app(ServeSettings(checkpoint=str(ckpt)))  # no lifespan here: nothing loads until we say so

    async def go():
        async with _asgi_client(app) as ac:
            r = await ac.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = await ac.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
            app.state.jojo.load()
            r = await ac.get("/health")
            assert r.status_code == 200
            assert (await ac.get("/v1/models")).json()["data"][0]["id"] == MODEL

    try:
        asyncio.run(go())
    finally:
        app.state.jojo.close()


def test_full_queue_answers_429(ckpt):
    model, tok, _ = load_checkpoint(ckpt)
    engine = BatchEngine(model, tok, max_batch=1, max_queue=2)  # not started: the queue never drains
    app = create_app(ServeSettings(), engine=engine, model_id=MODEL)
    from jojo.infer.engine import SamplingConfig

    for _ in range(2):
        engine.submit([1, 2, 3], SamplingConfig(max_tokens=4))

    async def go():
        async with _asgi_client(app) as ac:
            r = await ac.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"

    asyncio.run(go())
    r = openai.OpenAI(
        base_url="http://test/v1",
        api_key="x",
        max_retries=0,
        http_client=httpx.Client(
            transport=httpx.MockTransport(
                lambda req: httpx.Response(429, json={"error": {"message": "full", "type": "rate_limit_error"}})
            )
        ),
    )
    with pytest.raises(openai.RateLimitError):
        r.completions.create(model=MODEL, prompt="x")


def test_streams_are_paced_into_fewer_larger_chunks(ckpt):
    model, tok, _ = load_checkpoint(ckpt)
    engine = BatchEngine(model, tok, max_batch=4).start()
    body = {"prompt": "Once", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}

    async def chunks(interval: float, rate: float, streams: int = 1, others: int = 0) -> list[list[str]]:
        """The text chunks of each of `streams` streamed replies, sent together with `others` non-streamed ones."""
        app = create_app(ServeSettings(stream_interval=interval, stream_chunk_rate=rate), engine=engine, model_id=MODEL)
        async with _asgi_client(app) as ac:
            posts = [ac.post("/v1/completions", json=body) for _ in range(streams)]
            posts += [ac.post("/v1/completions", json={**body, "stream": False}) for _ in range(others)]
            replies = (await asyncio.gather(*posts))[:streams]
        out = []
        for r in replies:
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            out.append([e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]])
        return out

    try:
        with slow_steps(engine, 0.01):
            [every] = asyncio.run(chunks(0.0, 0.0))
            [paced] = asyncio.run(chunks(0.05, 0.0))
            # four streams at once, no interval of their own: the total rate paces each at 4 / 20 = 0.2 s
            together = asyncio.run(chunks(0.0, 20.0, streams=4))
            [alone] = asyncio.run(chunks(0.0, 20.0))  # one stream: 1 / 20 = 0.05 s
            # one stream beside three non-streamed requests: they send no chunks, so it is paced as if alone
            [beside] = asyncio.run(chunks(0.0, 20.0, others=3))
    finally:
        engine.close()
    assert "".join(paced) == "".join(every) == "".join(alone) == "".join(beside)
    assert len(every) >= 30 and len(paced) <= len(every) // 3 and len(alone) <= len(every) // 3
    assert all("".join(c) == "".join(every) for c in together)
    assert all(len(c) <= len(alone) * 2 // 3 for c in together), (len(alone), [len(c) for c in together])
    assert len(beside) > max(len(c) for c in together) + 1, (len(beside), [len(c) for c in together])


def test_a_paced_stream_ends_as_soon_as_its_text_does(ckpt):
    """The pause between two chunks is cut short when a choice finishes: its last text, finish_reason, usage and
    [DONE] go out at once, not at the next tick of the pace."""
    model, tok, _ = load_checkpoint(ckpt)
    engine = BatchEngine(model, tok, max_batch=2).start()
    app = create_app(ServeSettings(stream_interval=3.0), engine=engine, model_id=MODEL)
    body = {"prompt": "Once", "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip

    async def go() -> tuple[float, str]:
        async with _asgi_client(app) as ac:
            t0 = time.perf_counter()
            r = await ac.post("/v1/completions", json=body)
            return time.perf_counter() - t0, r.text

    try:
        with slow_steps(engine, 0.01):  # ~0.3 s of generation, well inside one 3 s pause
            seconds, text = asyncio.run(go())
    finally:
        engine.close()
    assert seconds < 2.0, f"the stream took {seconds:.2f} s: its end waited for the pace"
    assert text.rstrip().endswith("data: [DONE]") and '"completion_tokens":30' in text


def test_cors_is_off_unless_an_origin_is_given(ckpt):
    model, tok, _ = load_checkpoint(ckpt)
    engine = BatchEngine(model, tok, max_batch=1)
    pre = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}

    async def go(app):
        async with _asgi_client(app) as ac:
            return await ac.options("/v1/chat/completions", headers=pre)

    closed = asyncio.run(go(create_app(ServeSettings(), engine=engine, model_id=MODEL)))
    assert "access-control-allow-origin" not in closed.headers
    opened = asyncio.run(
        go(create_app(ServeSettings(cors_origins=("http://example.com",)), engine=engine, model_id=MODEL))
    )
    assert opened.headers["access-control-allow-origin"] == "http://example.com"


def test_jojo_serve_command_end_to_end(ckpt):
    """`jojo serve CKPT --port P` in a child process, the key from JOJO_API_KEY: loads, answers, stops on SIGTERM."""
    import os
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "JOJO_API_KEY": "sk-env"}
    cmd = [sys.executable, "-m", "jojo.cli", "serve", str(ckpt), "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, "jojo serve did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-env", max_retries=0, timeout=60)
        out = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert out.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="sk-other", max_retries=0).models.list()
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}/" in output


def test_cli_serve_rejects_a_missing_checkpoint_and_bad_flags(ckpt, tmp_path, capsys):
    from jojo.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--stream-chunk-rate", "-1"]) == 2
    assert "--stream-chunk-rate must be >= 0" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk must be >= 1" in capsys.readouterr().err


# ---- the chat page in headless Chromium ------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_chat_page_streams_uses_the_sliders_clears_and_survives_a_reload(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    engine = server.engine
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760})
            page.goto(server.url + "/")
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            page.wait_for_function(f"document.getElementById('status').textContent.includes('{MODEL}')")
            for slider, value in (("temperature", "0"), ("top_p", "0.5"), ("max_tokens", "16")):
                page.eval_on_selector(
                    f"#{slider}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value
                )
            page.fill("#system", "You are terse.")
            page.dispatch_event("#system", "input")
            # count the text updates of the reply: streaming shows it grow in several steps
            page.evaluate("""() => { window.__updates = 0;
                new MutationObserver(() => window.__updates++).observe(document.getElementById('messages'),
                    {subtree: true, childList: true, characterData: true}); }""")
            with slow_steps(engine, 0.02):
                page.fill("#input", "Hello there")
                page.press("#input", "Enter")
                page.wait_for_function(
                    "document.querySelector('.msg.assistant .bubble') && !document.querySelector('.bubble.pending')",
                    timeout=30000,
                )
            reply = page.text_content(".msg.assistant .bubble")
            assert page.evaluate("window.__updates") >= 4
            body = server.recorder.bodies[-1]
            assert body["stream"] is True and body["model"] == MODEL
            assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0, 0.5, 16)
            assert body["messages"] == [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello there"},
            ]
            same = client(server).chat.completions.create(
                model=MODEL, messages=body["messages"], temperature=0, max_tokens=16
            )
            assert reply == same.choices[0].message.content and reply
            page.screenshot(path="/tmp/jojo_page.png")

            page.reload()  # the history (and the settings) survive
            page.wait_for_selector(".msg.assistant .bubble")
            assert page.text_content(".msg.user .bubble") == "Hello there"
            assert page.text_content(".msg.assistant .bubble") == reply
            assert page.input_value("#temperature") == "0" and page.input_value("#system") == "You are terse."

            page.click("#clear")
            assert page.locator(".msg").count() == 0
            page.reload()
            page.wait_for_selector(".empty")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
