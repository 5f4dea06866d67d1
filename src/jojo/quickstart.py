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
import os
import time
from pathlib import Path

from jojo.api import LM, finetune, pretrain
from jojo.config import load_config
from jojo.data.loader import BatchLoader
from jojo.data.prepare import prepare_records
from jojo.data.synthetic import generate_corpus, heldout_questions, write_documents
from jojo.errors import JojoError, ensure_dir
from jojo.eval.chat import chat_exact_match
from jojo.eval.lm import evaluate_split
from jojo.eval.tasks import run_tasks
from jojo.infer.engine import SamplingConfig
from jojo.tokenizer import train_tokenizer

# Default budget (scale 1): sized for about five minutes in all on 2 CPU cores.
CORPUS_DOCS = 12_000
SFT_CHATS = 8_000  # synthetic conversations for the SFT stage (60% single questions, 40% corpus chats)
CHAT_FRACTION = 0.5  # of the pretraining corpus (the rest: stories)
MIN_DOCS = 1500  # below scale 1 the corpus shrinks too (tests run the pipeline at a small scale), to this floor
VOCAB_SIZE = 1024
PRETRAIN_SECONDS = 200.0  # the pretraining budget at scale 1 (`--time-budget`): a finished schedule on any machine
SFT_STEPS = 450  # chat fine-tuning steps at scale 1 (350 gave 97-100% exact match here; 450 for margin)
STORY_PROMPT = "Once upon a time"
N_QUESTIONS = 100


def _say(msg: str) -> None:
    print(msg, flush=True)


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
    """The whole pipeline (see the module docstring); returns the report it prints and writes."""
    if scale <= 0:
        raise JojoError("--scale must be > 0")
    t0 = time.time()
    out_dir = Path(out)
    if (out_dir / "model" / "latest").exists():
        raise JojoError(f"{out_dir} already holds a quickstart run; pass another --out or delete it")
    ensure_dir(out_dir)
    tok, meta = _make_data(out_dir, scale, seed)
    result = _pretrain(out_dir, scale, family, device, seed)
    report = {**_evaluate_base(out_dir, device, seed), **_report_training(result, out_dir)}
    questions = heldout_questions(N_QUESTIONS, seed=12345 + seed)
    base = LM.load(out_dir / "model", device)
    report["chat_exact_match_base"] = chat_exact_match(base.model, base.tokenizer, questions, max_tokens=48)[
        "exact_match"
    ]
    _say(f"      val {report['val_bpb']:.4f} bits/byte; held-out chat questions, base model: "
         f"{100 * report['chat_exact_match_base']:.0f}% exact")  # fmt: skip
    sft = _finetune(out_dir, scale, device, seed)
    _say("[7/7] answering the held-out chat questions with the fine-tuned model")
    chat = LM.load(out_dir / "sft", device)
    qa = chat_exact_match(chat.model, chat.tokenizer, questions, max_tokens=48)
    report.update(
        chat_exact_match=qa["exact_match"],
        chat_exact_match_by_kind={k: round(v, 3) for k, v in qa["by_kind"].items()},
        chat_questions=qa["n"],
        sft_steps=sft.fit.step,
        sft_seconds=round(sft.fit.wall_seconds, 1),
        sft_conversations=len(sft.data.train),
        sft_trained_fraction=round(sft.stats["trained_fraction"], 4),
        sft_val_loss=round(sft.fit.val_loss, 4) if sft.fit.val_loss is not None else None,
        chat_answers=[{k: r[k] for k in ("question", "expected", "answer", "ok")} for r in qa["rows"][:10]],
        chat_misses=[r for r in qa["rows"] if not r["ok"]][:20],
        checkpoint=str(out_dir / "model" / "latest"),
        chat_checkpoint=str(out_dir / "sft" / "latest"),
        wall_seconds=round(time.time() - t0, 1),
    )
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, out_dir)
    if report["val_bpb"] < report["entropy_floor_bpb"]:  # impossible unless the entropy accounting is wrong
        raise JojoError(
            f"val bits-per-byte {report['val_bpb']:.4f} is below the entropy floor "
            f"{report['entropy_floor_bpb']:.4f}: accounting bug"
        )
    return report


def _make_data(out_dir: Path, scale: float, seed: int):
    """Stages 1-3: the embedded corpus, a tokenizer trained on it, token shards with a validation split."""
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
    _say(
        f"      train {meta['splits']['train']['tokens']:,} tokens, val {val['tokens']:,} tokens; "
        f"val entropy floor {val['entropy_floor_bpb']:.4f} bits/byte"
    )
    return tok, meta


def _pretrain(out_dir: Path, scale: float, family: str, device: str, seed: int):
    """Stage 4: the tiny preset (or llama-tiny) on the shards."""
    preset = "tiny" if family == "gpt2" else "llama-tiny"
    overrides = {
        "data": {"dataset": str(out_dir / "data")},
        "schedule": {"max_seconds": PRETRAIN_SECONDS * scale},
        "system": {"device": device, "seed": 1337 + seed},
        "logging": {"out_dir": str(out_dir / "model")},
    }
    cfg = load_config(preset, overrides)
    _say(
        f"[4/7] pretraining the '{preset}' preset for {cfg.schedule.max_seconds:.0f} s "
        f"({cfg.data.batch_size} x {cfg.model.block_size} tokens per step; the schedule runs on the clock)"
    )
    return pretrain(preset, overrides=overrides)


def _evaluate_base(out_dir: Path, device: str, seed: int) -> dict:
    """Stage 5, through `jojo.eval` (what `jojo eval` reports): val bits per byte on the whole validation split
    next to the entropy floor, a zero-shot task on the shared slice when present, and three sample stories."""
    _say("[5/7] evaluating on the whole validation split")
    lm = LM.load(out_dir / "model", device)
    m = evaluate_split(lm.model, lm.tokenizer, out_dir / "data", "val", batch_size=8, max_batches=0)
    report = {
        "params": lm.model.num_params(),
        "family": lm.config.family,
        "val_loss": round(m["loss"], 4),
        "val_bpb": round(m["bpb"], 4),
        "entropy_floor_bpb": round(m["entropy_floor_bpb"], 4),
        "unigram_entropy_nats": round(unigram_entropy_nats(out_dir / "data"), 4),
        "stories": sample_stories(lm, 3, seed=seed),
    }
    shared = _shared_eval_dir()
    if shared is not None:
        hs = run_tasks(lm.model, lm.tokenizer, ["hellaswag"], data_dir=shared, limit=200)["hellaswag"]
        report["hellaswag_acc_norm"] = round(hs["acc_norm"], 4)
        report["hellaswag_items"] = hs["n"]
    return report


def _shared_eval_dir() -> Path | None:
    """$JOJO_EVAL_DIR, else ../shared/data/eval beside the checkout, when it holds HellaSwag."""
    from jojo.eval.tasks import task_file, task_spec

    for folder in (os.environ.get("JOJO_EVAL_DIR"), Path.cwd().parent / "shared" / "data" / "eval"):
        if folder and Path(folder).is_dir() and task_file(task_spec("hellaswag"), Path(folder)) is not None:
            return Path(folder)
    return None


def _report_training(result, out_dir: Path) -> dict:
    history = [json.loads(line) for line in (out_dir / "model" / "metrics.jsonl").read_text().splitlines()]
    return {
        "steps": result.step,
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_seconds": round(result.wall_seconds, 1),
        "loss_curve": [(r["step"], round(r["loss"], 4)) for r in history if r.get("event") == "train"],
    }


def _finetune(out_dir: Path, scale: float, device: str, seed: int):
    """Stage 6: chat SFT on the synthetic conversations, loss on the assistant turns only."""
    n_chats = max(int(SFT_CHATS * min(scale, 1.0)), 200)
    sft_overrides = {
        "data": {"dataset": "embedded", "embedded_chats": n_chats},
        "schedule": {"max_steps": max(int(round(SFT_STEPS * scale)), 1)},
        "system": {"device": device, "seed": 1337 + seed},
        "logging": {"out_dir": str(out_dir / "sft")},
    }
    steps = load_config("sft-tiny", sft_overrides).schedule.max_steps
    _say(
        f"[6/7] fine-tuning for chat (SFT) for {steps} steps on {n_chats:,} synthetic conversations, loss on the "
        "assistant turns only"
    )
    return finetune(out_dir / "model", overrides=sft_overrides, say=lambda m: _say(f"      {m}"))


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
    if "hellaswag_acc_norm" in r:
        print(f"hellaswag      acc_norm {100 * r['hellaswag_acc_norm']:.1f}% on {r['hellaswag_items']} items "
              "(chance 25%; a story model is not expected to know these)")  # fmt: skip
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
