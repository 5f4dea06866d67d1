"""Single-stream decode speed: Jojo's engine vs Hugging Face transformers' `generate`, on the same weights.

The model is random-init (speed does not depend on what the weights say), written as a Jojo checkpoint,
exported with `jojo.export.hf.export_hf`, and loaded back by transformers, so both sides run identical weights
on the same device and dtype. Three contenders decode `--new-tokens` greedy tokens after a short prompt:

- jojo:        `generate_stream` with its KV cache on the model as `jojo.LM.load` prepares it for inference
               (`jojo.infer.decode.convert_for_decoding`: one-row kernels timed per weight shape at load);
- transformers: `model.generate(do_sample=False)` with its default dynamic KV cache;
- no-cache:    `generate_stream(use_cache=False)` on the plain model, nanoGPT's loop, re-running the whole sequence
               per token (the floor).

Each timing is one whole generation (prefill included) divided by the tokens it produced. The contenders take
turns in each of `--repeats` rounds (after a warm-up round); we report each one's median tokens/s and, as the
ratio, the median over rounds of Jojo's rate divided by the contender's in the same round (a paired comparison: a
shared machine's speed drifts between rounds more than within one), with the range of those per-round ratios.
We also check that jojo and transformers produced the same tokens.

    python benchmarks/generate_throughput.py                # gpt2 6x384, ctx 512, vocab 4096, fp32, CPU
    python benchmarks/generate_throughput.py --family llama --dtype bf16
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jojo.checkpoint import write_checkpoint
from jojo.config import ModelConfig
from jojo.export.hf import export_hf
from jojo.infer.decode import convert_for_decoding
from jojo.infer.engine import SamplingConfig, generate_stream
from jojo.model import GPT
from jojo.tokenizer import train_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def corpus(n_docs: int = 4000, seed: int = 0):
    """Text over a Zipf-like vocabulary of 20,000 made-up words: enough variety for a BPE of ~4096 tokens."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    for _ in range(n_docs):
        yield " ".join(rng.choices(words, weights, k=60)) + "."


def timed(contenders: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Tokens/s of each contender (fn() -> generated ids) in each of `repeats` rounds after one warm-up round.

    The contenders take turns within each round, so a slow spell of a shared machine hits them alike."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    ids: dict[str, list[int]] = {}
    for r in range(repeats + 1):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            ids[name] = fn()
            if r:  # round 0 is the warm-up
                rates[name].append(len(ids[name]) / (time.perf_counter() - t0))
    return rates, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--skip-floor", action="store_true", help="do not time the no-cache loop (it is slow)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    tok = train_tokenizer(corpus(), args.vocab)
    cfg = ModelConfig(
        family=args.family,
        vocab_size=64 * -(-tok.vocab_size // 64),
        block_size=args.ctx,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.dim,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = GPT(cfg)
        write_checkpoint(Path(tmp) / "run", 0, model, tok, {})
        folder = export_hf(Path(tmp) / "run", Path(tmp) / "hf", dtype=args.dtype)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    model = model.to(device=device, dtype=dtype).eval()
    plain = GPT(cfg).to(device=device, dtype=dtype).eval()
    plain.load_state_dict(model.state_dict())
    t0 = time.perf_counter()
    convert_for_decoding(model)  # what LM.load does; a no-op off CPU float32
    convert_ms = 1000 * (time.perf_counter() - t0)

    prompt = tok.encode("Once upon a time, a little girl named Mia found a red ball in the park.")
    sc = SamplingConfig(max_tokens=args.new_tokens, temperature=0.0)
    hf_prompt = torch.tensor([prompt], device=device)
    hf.generation_config.eos_token_id = None  # decode exactly --new-tokens tokens, as Jojo does without stop ids
    hf.generation_config.pad_token_id = tok.eot_id

    def run_jojo(use_cache: bool = True) -> list[int]:
        m = model if use_cache else plain
        return list(generate_stream(m, prompt, sc, tok.vocab_size, use_cache=use_cache))

    @torch.inference_mode()
    def run_hf() -> list[int]:
        out = hf.generate(hf_prompt, max_new_tokens=args.new_tokens, do_sample=False)
        return out[0, len(prompt) :].tolist()

    n_params = model.num_params()
    print(
        f"model: {cfg.family} {cfg.n_layer}x{cfg.n_embd}, {cfg.n_head} heads, ctx {cfg.block_size}, "
        f"vocab {cfg.vocab_size} ({n_params / 1e6:.1f}M params), {args.dtype} on {device}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, median of {args.repeats} runs (+1 warm-up)")
    kernels = getattr(model, "decode_kernels", {})
    print(f"decode conversion: {convert_ms:.0f} ms, kernels per weight shape (out x in): {kernels}")
    contenders = {"jojo (KV cache)": run_jojo, "transformers generate": run_hf}
    if not args.skip_floor:
        contenders["no-cache (nanoGPT-style)"] = lambda: run_jojo(use_cache=False)
    rates, ids = timed(contenders, args.repeats)
    jojo = rates["jojo (KV cache)"]
    print(f"{'':<26} {'tokens/s':>8}   {'jojo / this':>11}   {'per round':>9}")
    for name, rate in rates.items():
        # The ratio pairs the runs of one round (taken seconds apart, so under the same machine load) and takes
        # the median of those per-round ratios; the middle column is each contender's own median.
        per_round = sorted(j / r for j, r in zip(jojo, rate))
        print(
            f"{name:<26} {statistics.median(rate):8.1f}   {statistics.median(per_round):10.2f}x"
            f"   {per_round[0]:.2f}-{per_round[-1]:.2f}x"
        )
    same = ids["jojo (KV cache)"] == ids["transformers generate"]
    print(f"jojo and transformers generated the same {len(ids['jojo (KV cache)'])} tokens: {same}")


if __name__ == "__main__":
    main()
