"""`jojo quickstart`: the whole pipeline on Jojo's own corpus, then a report.

generate corpus -> train tokenizer -> prepare shards -> pretrain the tiny preset -> evaluate (val bits per
byte next to the corpus's exact entropy floor) -> sample stories -> answer held-out chat questions -> fine-tune
for chat (SFT, the sft-tiny preset, on the synthetic chat set) -> answer the held-out questions again.

Every artefact lands in one run directory:

    OUT/corpus.jsonl     the generated documents, each with its information content in bits
    OUT/tokenizer.json
    OUT/data/            token shards + meta.json (with the entropy floor of each split)
    OUT/model/           the training run: checkpoints (latest, best), metrics.jsonl, loss.png
    OUT/sft/             the chat fine-tuning run, same layout (`jojo chat OUT/sft`)
    OUT/report.json      the report below, for scripts
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from jojo.api import LM, finetune, pretrain
from jojo.config import load_config
from jojo.data.loader import BatchLoader
from jojo.data.prepare import prepare_records
from jojo.data.synthetic import generate_corpus, heldout_questions, write_documents
from jojo.errors import JojoError, ensure_dir
from jojo.eval.lm import LN2, evaluate_loss
from jojo.infer.engine import SamplingConfig
from jojo.tokenizer import train_tokenizer

# Default budget (scale 1): sized for about five minutes in all on 2 CPU cores.
CORPUS_DOCS = 12_000
SFT_CHATS = 8_000  # synthetic conversations for the SFT stage (60% single questions, 40% corpus chats)
CHAT_FRACTION = 0.5  # of the pretraining corpus (the rest: stories)
MIN_DOCS = 1500  # below scale 1 the corpus shrinks too (tests run the pipeline at a small scale), to this floor
VOCAB_SIZE = 1024
STORY_PROMPT = "Once upon a time"
N_QUESTIONS = 100


def _say(msg: str) -> None:
    print(msg, flush=True)


def chat_exact_match(lm: LM, questions) -> tuple[float, list[dict]]:
    """Greedy answers to held-out questions, each compared whole with the expected answer."""
    rows = []
    for qa in questions:
        got = lm.chat([{"role": "user", "content": qa.question}], max_tokens=48, temperature=0).strip()
        rows.append({"question": qa.question, "expected": qa.answer, "answer": got, "ok": got == qa.answer})
    return sum(r["ok"] for r in rows) / max(len(rows), 1), rows


def sample_stories(lm: LM, n: int = 3, seed: int = 0, max_tokens: int = 160) -> list[str]:
    """n stories from one seeded random stream (each continues the stream the previous one left)."""
    gen = lm.generator
    g = gen.generator(seed)
    sc = SamplingConfig(max_tokens=max_tokens, temperature=0.8, top_k=50)
    return [STORY_PROMPT + gen.text(gen.prompt_ids(STORY_PROMPT), sc, generator=g) for _ in range(n)]


def unigram_entropy_nats(data_dir: Path) -> float:
    """Entropy of the train split's token frequencies: the loss of the best model that ignores context."""
    import numpy as np

    loader = BatchLoader(data_dir, "train", batch_size=1, block_size=1)
    counts = sum(np.bincount(np.asarray(s), minlength=loader.data.meta["vocab_size"]) for s in loader.data.shards)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_quickstart(
    out: str = "runs/quickstart", scale: float = 1.0, family: str = "gpt2", device: str = "auto", seed: int = 0
) -> dict:
    if scale <= 0:
        raise JojoError("--scale must be > 0")
    t0 = time.time()
    out_dir = Path(out)
    if (out_dir / "model" / "latest").exists():
        raise JojoError(f"{out_dir} already holds a quickstart run; pass another --out or delete it")
    ensure_dir(out_dir)

    n_docs = max(int(CORPUS_DOCS * scale), MIN_DOCS)
    _say(f"[1/7] generating the embedded corpus: {n_docs:,} stories and chats (seed {seed})")
    docs = generate_corpus(n_docs, seed=seed, chat_fraction=CHAT_FRACTION)
    write_documents(out_dir / "corpus.jsonl", docs)

    _say(f"[2/7] training a byte-level BPE tokenizer ({VOCAB_SIZE} tokens)")
    tok = train_tokenizer((d.text for d in docs), VOCAB_SIZE)
    tok.save(out_dir / "tokenizer.json")

    _say("[3/7] preparing token shards")
    records = ({"text": d.text, "bits": d.bits} for d in docs)
    meta = prepare_records(records, tok, out_dir / "data", val_fraction=0.05, seed=seed, source="embedded")
    val = meta["splits"]["val"]
    floor_bpb = val["entropy_floor_bpb"]
    _say(
        f"      train {meta['splits']['train']['tokens']:,} tokens, val {val['tokens']:,} tokens; "
        f"val entropy floor {floor_bpb:.4f} bits/byte"
    )

    preset = "tiny" if family == "gpt2" else "llama-tiny"
    overrides = {
        "data": {"dataset": str(out_dir / "data")},
        "schedule": {"max_steps": int(round(load_config(preset).schedule.max_steps * scale))},
        "system": {"device": device, "seed": 1337 + seed},
        "logging": {"out_dir": str(out_dir / "model")},
    }
    cfg = load_config(preset, overrides)
    _say(
        f"[4/7] pretraining the '{preset}' preset for {cfg.schedule.max_steps} steps "
        f"({cfg.data.batch_size} x {cfg.model.block_size} tokens per step)"
    )
    result = pretrain(preset, overrides=overrides)

    _say("[5/7] evaluating on the whole validation split")
    lm = LM.load(out_dir / "model", device)
    model, tok = lm.model, lm.tokenizer
    val_src = BatchLoader(out_dir / "data", "val", 8, model.config.block_size, shuffle=False, evaluation=True)
    val_loss, _ = evaluate_loss(model, val_src, lm.device)
    val_bpb = val_loss / LN2 / (val["bytes"] / val["tokens"])
    unigram = unigram_entropy_nats(out_dir / "data")

    stories = sample_stories(lm, 3, seed=seed)
    questions = heldout_questions(N_QUESTIONS, seed=12345 + seed)
    accuracy_base, _ = chat_exact_match(lm, questions)
    _say(f"      val {val_bpb:.4f} bits/byte; held-out chat questions, base model: {100 * accuracy_base:.0f}% exact")
    history = [json.loads(line) for line in (out_dir / "model" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], round(r["loss"], 4)) for r in history if r.get("event") == "train"]

    n_chats = max(int(SFT_CHATS * min(scale, 1.0)), 200)
    sft_overrides = {
        "data": {"dataset": "embedded", "embedded_chats": n_chats},
        "schedule": {"max_steps": max(int(round(load_config("sft-tiny").schedule.max_steps * scale)), 1)},
        "system": {"device": device, "seed": 1337 + seed},
        "logging": {"out_dir": str(out_dir / "sft")},
    }
    sft_cfg = load_config("sft-tiny", sft_overrides)
    _say(
        f"[6/7] fine-tuning for chat (SFT) for {sft_cfg.schedule.max_steps} steps on {n_chats:,} synthetic "
        "conversations, loss on the assistant turns only"
    )
    sft = finetune(out_dir / "model", overrides=sft_overrides, say=lambda m: _say(f"      {m}"))

    _say("[7/7] answering the held-out chat questions with the fine-tuned model")
    accuracy, qa_rows = chat_exact_match(LM.load(out_dir / "sft", device), questions)
    by_kind: dict[str, list[bool]] = {}
    for qa, row in zip(questions, qa_rows):
        by_kind.setdefault(qa.kind, []).append(row["ok"])

    report = {
        "params": model.num_params(),
        "family": model.config.family,
        "steps": result.step,
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_seconds": round(result.wall_seconds, 1),
        "val_loss": round(val_loss, 4),
        "val_bpb": round(val_bpb, 4),
        "entropy_floor_bpb": round(floor_bpb, 4),
        "unigram_entropy_nats": round(unigram, 4),
        "chat_exact_match_base": accuracy_base,
        "chat_exact_match": accuracy,
        "chat_exact_match_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
        "chat_questions": len(qa_rows),
        "sft_steps": sft.fit.step,
        "sft_seconds": round(sft.fit.wall_seconds, 1),
        "sft_conversations": len(sft.data.train),
        "sft_trained_fraction": round(sft.stats["trained_fraction"], 4),
        "sft_val_loss": round(sft.fit.val_loss, 4) if sft.fit.val_loss is not None else None,
        "loss_curve": curve,
        "stories": stories,
        "chat_answers": qa_rows[:10],
        "chat_misses": [row for row in qa_rows if not row["ok"]][:20],
        "checkpoint": str(out_dir / "model" / "latest"),
        "chat_checkpoint": str(out_dir / "sft" / "latest"),
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, out_dir)
    if val_bpb < floor_bpb:  # impossible unless the entropy accounting is wrong: say so loudly
        raise JojoError(f"val bits-per-byte {val_bpb:.4f} is below the entropy floor {floor_bpb:.4f}: accounting bug")
    return report


def _brief_curve(curve: list, points: int = 8) -> str:
    if not curve:
        return "(no steps)"
    idx = sorted({round(i * (len(curve) - 1) / (points - 1)) for i in range(points)})
    return "  ".join(f"{curve[i][0]}:{curve[i][1]:.2f}" for i in idx)


def print_report(r: dict, out_dir: Path) -> None:
    line = "=" * 78
    print(line)
    print("Jojo quickstart report")
    print(line)
    print(f"model          {r['family']}, {r['params']:,} parameters, {r['steps']} steps, {r['tokens_seen']:,} tokens")
    print(f"speed          {r['tokens_per_second']:,.0f} tokens/s ({r['train_seconds']:.0f} s of training)")
    print(f"loss curve     {_brief_curve(r['loss_curve'])}   (step:loss)")
    print(f"val loss       {r['val_loss']:.4f} nats/token (unigram entropy {r['unigram_entropy_nats']:.4f})")
    gap = r["val_bpb"] - r["entropy_floor_bpb"]
    print(
        f"val bpb        {r['val_bpb']:.4f} bits/byte   entropy floor {r['entropy_floor_bpb']:.4f}   (gap {gap:+.4f})"
    )
    print(line)
    for i, story in enumerate(r["stories"], 1):
        print(f"story {i}: {story.strip()}")
        print()
    print(line)
    print(
        f"SFT            {r['sft_steps']} steps on {r['sft_conversations']:,} conversations "
        f"({r['sft_seconds']:.0f} s); trained on {100 * r['sft_trained_fraction']:.1f}% of positions (assistant turns)"
    )
    print(
        f"held-out chat questions ({r['chat_questions']}): exact match {100 * r['chat_exact_match_base']:.1f}% "
        f"before SFT -> {100 * r['chat_exact_match']:.1f}% after"
    )
    kinds = "  ".join(f"{k} {100 * v:.0f}%" for k, v in r["chat_exact_match_by_kind"].items())
    print(f"  by kind: {kinds}")
    for row in r["chat_answers"][:5]:
        mark = "ok " if row["ok"] else "no "
        print(f"  {mark} Q: {row['question']}  A: {row['answer']!r}  (expected {row['expected']!r})")
    print(line)
    print(f"wall time      {r['wall_seconds']:.0f} s; artefacts in {out_dir}/ (report.json, model/loss.png)")
    print(f'next           jojo generate {out_dir}/model --prompt "Once upon a time"')
    print(f"               jojo chat {out_dir}/sft")
    if not math.isfinite(r["val_bpb"]):
        print("warning: validation loss is not finite")
