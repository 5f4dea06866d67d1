"""Parity of `jojo eval` with lm-evaluation-harness, item by item, on the same checkpoint and the same items.

1. a trained checkpoint: `--ckpt`, or (default) one trained here: a byte-level BPE of 4096 tokens and the `tiny`
   preset (gpt2, 4 layers x 128) with a context of `--block-size` 512 tokens, trained for `--steps` steps on the
   TinyStories excerpt in ../shared/data (cached in `--work`, so a second run reuses it); `--context N` evaluates
   a copy whose context is cut to N tokens, so that long items are left-truncated (lm-eval's `hf` model refuses
   a continuation longer than the context: PIQA needs a context of 333 tokens with this tokenizer);
2. exported with `jojo.export.hf.export_hf` (a plain GPT2LMHeadModel / LlamaForCausalLM folder);
3. lm-evaluation-harness's `hf` model on local-file task configs written here (`dataset_path: json` over the
   shared JSONL files: doc_to_text = query, doc_to_choice = choices, doc_to_target = gold, target_delimiter " ",
   metrics acc and acc_norm), with `log_samples` for the per-item log-likelihoods;
4. `jojo.eval.tasks.run_tasks` on the same files and `--limit`;
5. per item: the choice by sum (acc) and by sum / characters (acc_norm) must be the same on both sides, and so
   must the aggregate acc / acc_norm; the largest difference between the two sides' log-likelihoods is printed.

Exit status 1 when any item differs.

    python benchmarks/eval_parity.py                            # HellaSwag (shared 1,000) and PIQA (1,838)
    python benchmarks/eval_parity.py --tasks hellaswag --context 128     # items longer than 129 tokens truncated
    python benchmarks/eval_parity.py --ckpt runs/tiny --shared /path/to/shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASK_FILES = {"hellaswag": "hellaswag_val_head.jsonl", "piqa": "piqa.jsonl", "arc-easy": "arc_easy.jsonl",
              "arc-challenge": "arc_challenge.jsonl"}  # fmt: skip


def build_checkpoint(work: Path, steps: int, family: str, corpus: Path, block_size: int) -> Path:
    """Train (once) a small model on the TinyStories excerpt; returns the run directory."""
    from jojo.config import load_config
    from jojo.data.prepare import prepare_corpus
    from jojo.data.recipes import open_source
    from jojo.train.run import run_training

    run = work / f"run-{family}-{steps}-{block_size}"
    if (run / "latest").exists():
        return run
    data = work / "data"
    prepare_corpus(open_source(str(corpus)), data, vocab_size=4096, workers=1, log=lambda _: None)
    preset = "tiny" if family == "gpt2" else "llama-tiny"
    cfg = load_config(
        preset,
        {
            "model": {"block_size": block_size},
            "data": {"dataset": str(data), "batch_size": max(1, 16 * 256 // block_size)},
            "schedule": {"max_steps": steps},
            "system": {"device": "cpu", "seed": 0},
            "logging": {"out_dir": str(run), "eval_interval": steps, "progress": False},
        },
    )
    result = run_training(cfg)
    print(f"trained {run}: {steps} steps, val loss {result.val_loss:.3f}, val bpb {result.val_bpb:.3f}")
    return run


def cut_context(ckpt: Path, context: int, out: Path) -> Path:
    """A copy of the checkpoint whose context is cut to `context` tokens (the gpt2 family drops the position
    table's tail), so that long items are left-truncated on both sides."""
    import dataclasses

    from jojo.checkpoint import load_checkpoint, write_checkpoint
    from jojo.model import GPT

    model, tok, state = load_checkpoint(ckpt)
    cfg = dataclasses.replace(model.config, block_size=context)
    short = GPT(cfg)
    weights = {k: v[:context] if k == "wpe.weight" else v for k, v in model.state_dict().items()}
    short.load_state_dict(weights, strict=False)
    if cfg.tie_embeddings:
        short.lm_head.weight = short.wte.weight
    return write_checkpoint(out, int(state.get("step", 0)), short, tok, {})


def task_yaml(name: str, path: Path) -> str:
    return f"""task: jojo_parity_{name.replace("-", "_")}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="a checkpoint or run directory (default: train one, see above)")
    ap.add_argument("--work", default="/tmp/jojo-eval-parity", help="folder for the trained run, export, configs")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--block-size", type=int, default=512, help="context of the model trained here")
    ap.add_argument("--context", type=int, help="evaluate with the context cut to N tokens (exercises truncation)")
    ap.add_argument("--tasks", default="hellaswag,piqa")
    ap.add_argument("--limit", type=int, default=0, help="first N items of each task (0 = all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shared", default=str(SHARED), help="the shared data folder (TinyStories excerpt, eval/)")
    ap.add_argument("--data-dir", help="task files (default: SHARED/eval)")
    args = ap.parse_args()
    shared = Path(args.shared)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from jojo.checkpoint import load_checkpoint, resolve_checkpoint
    from jojo.eval.tasks import run_tasks
    from jojo.export.hf import export_hf

    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stories = shared / "tinystories" / "tinystories_train_head.txt"
    run = Path(args.ckpt) if args.ckpt else build_checkpoint(work, args.steps, args.family, stories, args.block_size)
    ckpt = resolve_checkpoint(run)
    if args.context:
        cut = work / f"{ckpt.parent.name}-context-{args.context}"
        ckpt = resolve_checkpoint(cut) if (cut / "latest").exists() else cut_context(ckpt, args.context, cut)
    hf_dir = work / f"hf-{ckpt.parent.name}-{ckpt.name}"
    if not hf_dir.exists():
        export_hf(ckpt, hf_dir)
    conf = work / "tasks"
    conf.mkdir(exist_ok=True)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data_dir = Path(args.data_dir) if args.data_dir else shared / "eval"
    for name in names:
        (conf / f"jojo_parity_{name.replace('-', '_')}.yaml").write_text(task_yaml(name, data_dir / TASK_FILES[name]))

    model, tok, state = load_checkpoint(ckpt, "cpu")
    print(f"checkpoint {ckpt} (step {state.get('step')}, {model.num_params():,} parameters), export {hf_dir}")
    print(f"torch {torch.__version__}, lm-eval {lm_eval.__version__}, {torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32",
        tasks=[f"jojo_parity_{n.replace('-', '_')}" for n in names],
        task_manager=TaskManager(include_path=str(conf)),
        batch_size=args.batch_size,
        device="cpu",
        limit=args.limit or None,
        log_samples=True,
    )
    t_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = run_tasks(model, tok, names, data_dir=data_dir, limit=args.limit, batch_size=args.batch_size,
                     return_items=True)  # fmt: skip
    t_ours = time.perf_counter() - t0

    failed = False
    rows = []
    for name in names:
        key = f"jojo_parity_{name.replace('-', '_')}"
        samples = sorted(theirs["samples"][key], key=lambda s: s["doc_id"])
        mine = ours[name]["items"]
        assert len(samples) == len(mine), (len(samples), len(mine))
        diff_acc = diff_norm = 0
        max_ll = 0.0
        for s, m in zip(samples, mine):
            lls = [float(r[0]) for r in s["filtered_resps"]]
            choices = s["doc"]["choices"]
            pred = argmax(lls)
            pred_norm = argmax([ll / len(c) for ll, c in zip(lls, choices)])
            diff_acc += pred != m["pred"] or float(s["acc"]) != m["acc"]
            diff_norm += pred_norm != m["pred_norm"] or float(s["acc_norm"]) != m["acc_norm"]
            max_ll = max(max_ll, max(abs(a - b) for a, b in zip(lls, m["logprobs"])))
        res = theirs["results"][key]
        agg_same = (res["acc,none"] == ours[name]["acc"]) and (res["acc_norm,none"] == ours[name]["acc_norm"])
        failed |= bool(diff_acc or diff_norm or not agg_same)
        rows.append(
            f"| {name} | {len(mine):,} | {ours[name]['truncated']} | {res['acc,none']:.4f} / {ours[name]['acc']:.4f} | "
            f"{res['acc_norm,none']:.4f} / {ours[name]['acc_norm']:.4f} | {diff_acc} | {diff_norm} | {max_ll:.2e} |"
        )
    print()
    print(f"context {model.config.block_size} tokens")
    print("| task | items | requests truncated | acc: lm-eval hf / jojo | acc_norm: lm-eval hf / jojo | items whose "
          "acc choice differs | items whose acc_norm choice differs | max abs log-likelihood difference |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nwall: lm-eval hf {t_theirs:.1f} s, jojo {t_ours:.1f} s (one pass each, including tokenization)")
    print("PARITY: FAILED" if failed else "PARITY: every item and aggregate identical")
    json_out = work / "parity.json"
    json_out.write_text(json.dumps({"rows": rows, "failed": failed, "t_lm_eval": t_theirs, "t_jojo": t_ours}) + "\n")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
