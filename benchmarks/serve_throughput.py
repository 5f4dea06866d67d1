"""Serving throughput: 8 concurrent streams through `jojo serve` vs one stream, and vs transformers' batched generate.

The model is set up as in benchmarks/generate_throughput.py (random init, 6 layers x 384, 6 heads, vocabulary 4096,
context 512, fp32 on CPU), written as a Jojo checkpoint, exported with `jojo.export.hf.export_hf` and loaded back
by transformers' `AutoModelForCausalLM`: every contender runs the same weights.

`jojo serve` runs as a child process (`python -m jojo.cli serve CKPT`), this process is the HTTP client (a minimal
asyncio HTTP/1.1 client written here, so that the client, which shares the CPU with the server, costs as little
as possible; server-sent events, greedy, `ignore_eos` so every request makes exactly --new-tokens tokens).
Contenders, taking turns in each of --repeats rounds after a warm-up round (a shared machine's speed drifts
between rounds more than within one):

- serve x1:      one streamed completion;
- serve x8:      eight streamed completions of eight different prompts, sent together (as transformers gets its
                 eight prompts together in one batch);
- serve x8 staggered: the same eight sent --stagger seconds apart, so the later ones join a batch that is already
                 decoding (their prefill interleaves with its steps): continuous batching, and the time to first
                 token of a request arriving under load;
- transformers:  `model.generate` on the same eight prompts as one left-padded batch, greedy, no stop token,
                 and on the first prompt alone (x1);
- engine x1/x8:  the same two through `BatchEngine.generate_many` in this process (no HTTP), for reference.

tokens/s = all new tokens / wall time from the first request sent to the last token received (prefill
included, for every contender alike). Time to first token (TTFT): send -> first text chunk, per request. Ratios
are medians over rounds of the per-round ratio.

    python benchmarks/serve_throughput.py                  # gpt2 6x384, ctx 512, vocab 4096, fp32, CPU
    python benchmarks/serve_throughput.py --family llama
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_throughput import corpus  # noqa: E402  (the same tokenizer corpus)

from jojo.checkpoint import load_checkpoint, write_checkpoint  # noqa: E402
from jojo.config import ModelConfig  # noqa: E402
from jojo.export.hf import export_hf  # noqa: E402
from jojo.infer.batch import BatchEngine  # noqa: E402
from jojo.infer.engine import SamplingConfig  # noqa: E402
from jojo.model import GPT  # noqa: E402
from jojo.tokenizer import train_tokenizer  # noqa: E402

PROMPTS = [
    "Once upon a time, a little girl named Mia found a red ball in the park.",
    "The old fisherman pulled his boat onto the sand and looked at the sky.",
    "In the middle of the forest there was a small house with a green door.",
    "Tom wanted to build the tallest tower of blocks that anyone had ever seen.",
    "Every morning the baker opened his shop before the sun came up over the hill.",
    "A tiny robot rolled across the kitchen floor, looking for its lost wheel.",
    "The two friends sat on the bench and shared a sandwich while it rained.",
    "Far away, on a mountain covered in snow, lived a very curious goat.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIRST_TEXT = re.compile(rb'"text":"[^"]')  # a completion chunk with text (an empty one carries "text":"")


async def stream_one(host: str, port: int, prompt: str, n: int, delay: float) -> tuple[float, float, float, int]:
    """-> (sent, first text chunk, last byte, completion tokens), perf_counter times.

    The client shares the 2 cores with the server, so it is as light as a client can be: one HTTP/1.1 request on
    its own connection (`Connection: close`) written by hand, the streamed body read in whatever pieces the socket
    gives until the server closes, the first text chunk spotted by its bytes, and only the usage chunk decoded at
    the end (an httpx client parsing every SSE line cost about as much CPU as the server's event loop)."""
    await asyncio.sleep(delay)
    body = json.dumps({
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + body)
    first = 0.0
    parts = []
    while True:
        piece = await reader.read(1 << 16)
        if not piece:
            break
        parts.append(piece)
        if not first and FIRST_TEXT.search(piece):
            first = time.perf_counter()
    last = time.perf_counter()
    writer.close()
    raw = b"".join(parts)
    if not raw.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"jojo serve answered: {raw[:300]!r}")
    usage = raw[raw.rindex(b'"usage":{') + 8 :]
    tokens = json.loads(usage[: usage.index(b"}") + 1])["completion_tokens"]
    return sent, first, last, tokens


async def serve_run(url: str, prompts: list[str], n: int, stagger: float) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    res = await asyncio.gather(*(stream_one(host, int(port), p, n, i * stagger) for i, p in enumerate(prompts)))
    start = min(r[0] for r in res)
    end = max(r[2] for r in res)
    return {"tokens": sum(r[3] for r in res), "seconds": end - start, "ttft": [r[1] - r[0] for r in res]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stagger", type=float, default=0.05, help="seconds between arrivals in 'serve x8 staggered'")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads, both sides (0 = torch's default)")
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process engine rows")
    ap.add_argument("--stream-interval", type=float, default=None, help="jojo serve --stream-interval (default its)")
    ap.add_argument(
        "--stream-chunk-rate", type=float, default=None, help="jojo serve --stream-chunk-rate (default: its)"
    )
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = train_tokenizer(corpus(), args.vocab)
    cfg = ModelConfig(
        family=args.family,
        vocab_size=64 * -(-tok.vocab_size // 64),
        block_size=args.ctx,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.dim,
    )
    tmp = tempfile.TemporaryDirectory()
    run = Path(tmp.name) / "bench"
    write_checkpoint(run, 0, GPT(cfg), tok, {})
    hf = AutoModelForCausalLM.from_pretrained(export_hf(run, Path(tmp.name) / "hf"), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly --new-tokens tokens, as the server's ignore_eos
    hf.generation_config.pad_token_id = tok.eot_id

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "jojo.cli",
        "serve",
        str(run),
        "--port",
        str(port),
        "--max-batch",
        "8",
        "--device",
        "cpu",
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.stream_interval is not None:
        cmd += ["--stream-interval", str(args.stream_interval)]
    if args.stream_chunk_rate is not None:
        cmd += ["--stream-chunk-rate", str(args.stream_chunk_rate)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("jojo serve did not come up")
            time.sleep(0.5)

        ids = [tok.encode(p) for p in PROMPTS]
        width = max(len(i) for i in ids)
        batch = torch.tensor([[tok.eot_id] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])

        @torch.inference_mode()
        def run_hf(k: int) -> dict:
            t0 = time.perf_counter()
            rows = batch[:k] if k > 1 else torch.tensor([ids[0]])  # one prompt alone: no padding
            out = hf.generate(
                rows, attention_mask=mask[:k] if k > 1 else None, max_new_tokens=args.new_tokens, do_sample=False
            )
            return {"tokens": (out.shape[1] - rows.shape[1]) * k, "seconds": time.perf_counter() - t0, "ttft": []}

        engine = None
        if not args.no_engine:
            model, etok, _ = load_checkpoint(run, "cpu")
            engine = BatchEngine(model, etok, max_batch=8)
        sc = SamplingConfig(max_tokens=args.new_tokens, temperature=0.0)

        def run_engine(k: int) -> dict:
            t0 = time.perf_counter()
            res = engine.generate_many(ids[:k], sc, stop_ids=())
            return {"tokens": sum(len(r.token_ids) for r in res), "seconds": time.perf_counter() - t0, "ttft": []}

        contenders = {
            "serve x1": lambda: asyncio.run(serve_run(url, PROMPTS[:1], args.new_tokens, 0.0)),
            "serve x8": lambda: asyncio.run(serve_run(url, PROMPTS, args.new_tokens, 0.0)),
            "serve x8 staggered": lambda: asyncio.run(serve_run(url, PROMPTS, args.new_tokens, args.stagger)),
            "transformers x8 (padded batch)": lambda: run_hf(8),
            "transformers x1": lambda: run_hf(1),
        }
        if engine is not None:
            contenders["engine x1 (no HTTP)"] = lambda: run_engine(1)
            contenders["engine x8 (no HTTP)"] = lambda: run_engine(8)
        rates: dict[str, list[float]] = {k: [] for k in contenders}
        ttft: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(args.repeats + 1):
            for name, fn in contenders.items():
                out = fn()
                if r:  # round 0 warms up
                    rates[name].append(out["tokens"] / out["seconds"])
                    ttft[name] += out["ttft"]
            if r:
                row = "  ".join(f"{k.split(' (')[0]} {v[-1]:.0f}" for k, v in rates.items())
                print(f"round {r}: tokens/s  {row}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
        tmp.cleanup()

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(
        f"\nmodel: {cfg.family} {cfg.n_layer}x{cfg.n_embd}, ctx {cfg.block_size}, vocab {cfg.vocab_size}, fp32 CPU "
        f"({cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads); "
        f"{args.new_tokens} new tokens per request, median of {args.repeats} rounds"
    )

    def ratio(a: str, b: str) -> str:
        per = sorted(x / y for x, y in zip(rates[a], rates[b]))
        return f"{statistics.median(per):.2f}x ({per[0]:.2f}-{per[-1]:.2f})"

    for name, v in rates.items():
        t = ttft[name]
        extra = f"   TTFT median {statistics.median(t) * 1e3:.0f} ms, max {max(t) * 1e3:.0f} ms" if t else ""
        print(f"{name:<32} {statistics.median(v):8.1f} tokens/s{extra}")
    print(f"serve x8 / serve x1:              {ratio('serve x8', 'serve x1')}   (target >= 4x)")
    print(f"serve x8 / transformers x8:       {ratio('serve x8', 'transformers x8 (padded batch)')}   (target >= 2x)")
    print(f"serve x1 / transformers x1:       {ratio('serve x1', 'transformers x1')}   (target >= 2x)")
    print(f"serve x8 staggered / serve x1:    {ratio('serve x8 staggered', 'serve x1')}")
    if engine is not None:
        print(f"engine x1 / transformers x1:      {ratio('engine x1 (no HTTP)', 'transformers x1')}")
        print(f"engine x8 / engine x1:            {ratio('engine x8 (no HTTP)', 'engine x1 (no HTTP)')}")
        print(f"engine x8 / transformers x8:      {ratio('engine x8 (no HTTP)', 'transformers x8 (padded batch)')}")
        print(f"serve x8 / engine x8 (HTTP cost): {ratio('serve x8', 'engine x8 (no HTTP)')}")


if __name__ == "__main__":
    main()
