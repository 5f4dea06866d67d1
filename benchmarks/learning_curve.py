"""Held-out bits per byte after the same wall-clock budget: Jojo's default recipe vs a nanoGPT-style loop.

Both contenders train a model of the same shape on the same token shards for the same number of seconds on the
same CPU, one after the other, and are scored by the same code (`jojo.eval.lm.evaluate_split`, float32, every
token of the held-out split in windows of the context length):

- jojo:    `jojo.pretrain(PRESET, time_budget=BUDGET)`: the preset's recipe and every default as a user gets it
           (bf16 autocast where the CPU has native bf16, `system.compile` auto, the loader's windows, the
           preset's optimizer and schedule run on elapsed time); its evaluations and checkpoint saves are inside
           the budget;
- nanogpt: `benchmarks/nanogpt_style.py`: GPT-2 blocks of the same sizes, float32, AdamW (lr `--peer-lr`, betas
           (0.9, 0.99), weight decay 0.1), warm-up then cosine to lr/10 over the steps its measured speed fits into
           the budget, batches of random windows, the preset's batch size.

Data (`--corpus`): `tinystories`, the TinyStories excerpt in ../shared/data, prepared with a byte-level BPE of
4096 tokens and 5% of its documents held out (`jojo prepare`'s split); or `embedded`, Jojo's generated corpus
(the quickstart's: 12,000 documents, BPE of 1024) with its own held-out split, whose entropy floor is printed.
Sizes (`--size`): `tiny` (the tiny preset: gpt2 4 x 128, context 256) and `small` (the small preset: 6 x 384,
context 256, ~12M parameters with this vocabulary). The peer always builds GPT-2 blocks of the preset's layers,
width and heads; Jojo builds the preset's own blocks (GPT-2's for `tiny`; for `small` Llama's: RoPE, RMSNorm,
SwiGLU with as many MLP weights as GELU's 4x, no biases, tied embeddings), so the two differ by the position
table and the biases (12.19M vs 12.32M parameters at `small`), both printed.

    python benchmarks/learning_curve.py --corpus tinystories --size tiny --budget 120
    python benchmarks/learning_curve.py --corpus tinystories --size small --budget 300
    python benchmarks/learning_curve.py --corpus embedded --size tiny --budget 120
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt_style import NanoGPT, configure_optimizer, cosine_lr, random_batch, train_step  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def prepare_data(corpus: str, work: Path, shared: Path) -> Path:
    """Token shards with a held-out split (cached in `work`)."""
    data = work / f"data-{corpus}"
    if (data / "meta.json").exists():
        return data
    from jojo.data.prepare import prepare_corpus, prepare_records
    from jojo.data.recipes import open_source
    from jojo.data.synthetic import generate_corpus
    from jojo.tokenizer import train_tokenizer

    if corpus == "tinystories":
        source = shared / "tinystories" / "tinystories_train_head.txt"
        if not source.exists():
            raise SystemExit(f"{source} is missing; pass --shared /path/to/shared/data")
        prepare_corpus(open_source(str(source)), data, vocab_size=4096, workers=1, log=lambda _: None)
    else:
        docs = generate_corpus(12_000, seed=0, chat_fraction=0.5)
        tok = train_tokenizer((d.text for d in docs), 1024)
        tok.save(work / "embedded-tokenizer.json")
        records = ({"text": d.text, "bits": d.bits} for d in docs)
        prepare_records(records, tok, data, val_fraction=0.05, seed=0, source="embedded")
    return data


def train_tokens(data: Path) -> np.ndarray:
    from jojo.data.loader import TokenSplit

    return np.concatenate([np.asarray(s) for s in TokenSplit(data, "train").shards])


def run_jojo(preset: str, data: Path, out: Path, budget: float, seed: int, extra: list[str]) -> tuple:
    import jojo
    from jojo.checkpoint import load_checkpoint

    result = jojo.pretrain(
        preset,
        dataset=data,
        out=out,
        time_budget=f"{budget:g}s",
        overrides=["--system.device=cpu", f"--system.seed={seed}", "--logging.progress=false", *extra],
        quiet=True,
    )
    model, _, _ = load_checkpoint(result.checkpoint, torch.device("cpu"))
    info = {"steps": result.step, "tokens": result.tokens_seen, "seconds": round(result.wall_seconds, 1)}
    return model, info


def run_nanogpt(preset: str, data: Path, budget: float, seed: int, lr: float) -> tuple[torch.nn.Module, dict]:
    from jojo.config import load_config
    from jojo.data.prepare import load_meta

    cfg = load_config(preset)
    m, batch = cfg.model, cfg.data.batch_size
    vocab = load_meta(data)["vocab_size"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokens = train_tokens(data)
    model = NanoGPT(vocab, m.block_size, m.n_layer, m.n_embd, m.n_head).train()
    opt = configure_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.99))
    warmup, planned, step = cfg.schedule.warmup_steps, None, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget:
        if step == 10:  # plan the cosine from the speed of the first steps, as one sets max_iters by hand
            planned = max(int(budget / ((time.perf_counter() - t0) / 10)), warmup + 1)
        x, y = random_batch(tokens, batch, m.block_size, rng)
        train_step(model, opt, x, y, cosine_lr(step, planned or 10**9, lr, warmup))
        step += 1
    model.config = types.SimpleNamespace(block_size=m.block_size)  # what evaluate_split reads
    info = {"steps": step, "tokens": step * batch * m.block_size, "seconds": round(time.perf_counter() - t0, 1)}
    return model, info


def heldout(model: torch.nn.Module, tokenizer, data: Path) -> dict:
    from jojo.eval.lm import evaluate_split

    m = evaluate_split(model.eval(), tokenizer, data, "val", batch_size=8, device=torch.device("cpu"))
    return {"bpb": m["bpb"], "loss": m["loss"], "floor": m.get("entropy_floor_bpb")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=["tinystories", "embedded"], default="tinystories")
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of training per contender")
    ap.add_argument("--peer-lr", type=float, default=1e-3, help="the nanoGPT loop's peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["jojo", "nanogpt"])
    ap.add_argument("--jojo", action="append", default=[], metavar="--KEY=VALUE",
                    help="a config override for Jojo's run, repeatable: --jojo=--optimizer.name=muon")  # fmt: skip
    ap.add_argument("--work", default="/tmp/jojo-learning-curve")
    ap.add_argument("--shared", default=str(SHARED))
    args = ap.parse_args()

    from jojo.tokenizer import Tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.corpus, work, Path(args.shared))
    tok_file = data.parent / "embedded-tokenizer.json" if args.corpus == "embedded" else data / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_file)
    meta = json.loads((data / "meta.json").read_text())
    splits = meta["splits"]
    print(f"corpus {args.corpus}: train {splits['train']['tokens']:,} tokens, held out {splits['val']['tokens']:,}; "
          f"vocab {meta['vocab_size']}; preset {args.size}; budget {args.budget:g} s each; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    results = {}
    for name in ("jojo", "nanogpt"):
        if args.only and name != args.only:
            continue
        if name == "jojo":
            out = work / f"run-{args.corpus}-{args.size}-{int(time.time())}"
            model, info = run_jojo(args.size, data, out, args.budget, args.seed, args.jojo)
        else:
            model, info = run_nanogpt(args.size, data, args.budget, args.seed, args.peer_lr)
        info.update(heldout(model, tokenizer, data))
        info["params"] = sum(p.numel() for p in model.parameters())
        results[name] = info
        floor = f" (entropy floor {info['floor']:.4f}, {info['bpb'] / info['floor']:.2f}x)" if info["floor"] else ""
        print(f"{name:>8}: held-out {info['bpb']:.4f} bits/byte{floor}; {info['params']:,} parameters, "
              f"{info['steps']} steps, {info['tokens']:,} tokens in {info['seconds']} s", flush=True)  # fmt: skip
    if len(results) == 2:
        gain = 1 - results["jojo"]["bpb"] / results["nanogpt"]["bpb"]
        print(f"jojo / nanogpt held-out bpb: {results['jojo']['bpb'] / results['nanogpt']['bpb']:.3f} "
              f"({100 * gain:.1f}% lower)")  # fmt: skip
    print(json.dumps({k: {kk: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                          for kk, v in r.items()} for k, r in results.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
