"""HellaSwag items per second: `jojo eval`'s engine vs lm-evaluation-harness's `hf` model, same weights, same
items, same CPU.

The model: a checkpoint (`--ckpt`), or a random-init one built here (speed does not depend on what the weights
say): gpt2 family, `--layers` x `--dim`, context 256, with the tokenizer of `--tokenizer-from` (a checkpoint),
else a BPE of 4096 tokens trained on the TinyStories excerpt (as eval_parity.py's). It is written as a Jojo
checkpoint, exported with `jojo.export.hf.export_hf` and loaded by lm-eval's `HFLM` (float32), so both sides run
identical weights.

Per round, each contender scores the first `--limit` items of the shared HellaSwag file (4 choices each):

- jojo:       `jojo.eval.tasks.run_task(model, tok, "hellaswag", limit=N, batch_size=B)`: reads the file,
              tokenizes, scores, computes acc / acc_norm / acc_norm_token;
- lm-eval hf: `HFLM.loglikelihood(requests)` on the same (query, " " + choice) requests, built beforehand (the
              requests lm-eval's multiple_choice task makes): tokenization and scoring only, none of lm-eval's
              task setup, so this favours lm-eval;
- (--end-to-end) lm-eval hf through `simple_evaluate` on a local-file task config (its real cost per run).

Contenders take turns in every round (after a warm-up round) so the load of a shared machine hits them alike; the
ratio is the median over rounds of (jojo items/s) / (lm-eval items/s) in the same round, with its range.

    python benchmarks/eval_throughput.py --shared ../shared/data                       # tiny preset size (4 x 128)
    python benchmarks/eval_throughput.py --shared ../shared/data --layers 6 --dim 384 --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="a checkpoint or run directory (default: random-init, see --layers/--dim)")
    ap.add_argument("--tokenizer-from", help="a checkpoint whose tokenizer to use (default: train a BPE of 4096)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward, both sides")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--end-to-end", action="store_true", help="also time lm-eval's simple_evaluate")
    ap.add_argument("--shared", default=str(SHARED))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from jojo.checkpoint import load_checkpoint, resolve_checkpoint, write_checkpoint
    from jojo.config import ModelConfig
    from jojo.eval import tasks as zs
    from jojo.export.hf import export_hf
    from jojo.model import GPT
    from jojo.tokenizer import Tokenizer

    data_dir = Path(args.shared) / "eval"
    work = Path(tempfile.mkdtemp(prefix="jojo-eval-speed-"))
    if args.ckpt:
        ckpt = resolve_checkpoint(args.ckpt)
    else:
        if args.tokenizer_from:
            tok = Tokenizer.load(resolve_checkpoint(args.tokenizer_from))
        else:
            from jojo.data.recipes import open_source
            from jojo.tokenizer import train_tokenizer

            stories = open_source(str(Path(args.shared) / "tinystories" / "tinystories_train_head.txt"))
            tok = train_tokenizer((r["text"] for r in stories.records()), 4096)
        torch.manual_seed(0)
        cfg = ModelConfig(family="gpt2", vocab_size=64 * -(-tok.vocab_size // 64), block_size=args.ctx,
                          n_layer=args.layers, n_head=args.heads, n_embd=args.dim)  # fmt: skip
        ckpt = write_checkpoint(work / "run", 0, GPT(cfg), tok, {})
    hf_dir = work / "hf"
    export_hf(ckpt, hf_dir)
    model, tok, _ = load_checkpoint(ckpt, "cpu")
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
    spec, items, _ = zs.load_items("hellaswag", data_dir, args.limit)
    requests = [
        Instance("multiple_choice", item, (item["query"], " " + choice), i, ("hellaswag", n, 1))
        for n, item in enumerate(items)
        for i, choice in enumerate(item["choices"])
    ]
    n = len(items)
    c = model.config
    print(f"model: {model.num_params():,} parameters ({c.n_layer} x {c.n_embd}, context {c.block_size}, vocab "
          f"{c.vocab_size}); {n} HellaSwag items, {len(requests)} requests; batch {args.batch_size} rows")  # fmt: skip
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), lm-eval {lm_eval.__version__}")

    def run_jojo():
        return zs.run_task(model, tok, "hellaswag", data_dir=data_dir, limit=args.limit, batch_size=args.batch_size)

    def run_hf():
        return hf.loglikelihood(requests, disable_tqdm=True)

    contenders = {"jojo": run_jojo, "lm-eval hf": run_hf}
    if args.end_to_end:
        from lm_eval.tasks import TaskManager

        conf = work / "tasks"
        conf.mkdir()
        (conf / "jojo_speed_hellaswag.yaml").write_text(
            "task: jojo_speed_hellaswag\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data_dir / 'hellaswag_val_head.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
            "doc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: ' '\n"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
        manager = TaskManager(include_path=str(conf))

        def run_e2e():
            return lm_eval.simple_evaluate(model=hf, tasks=["jojo_speed_hellaswag"], task_manager=manager,
                                           limit=args.limit, verbosity="ERROR")  # fmt: skip

        contenders["lm-eval hf, simple_evaluate"] = run_e2e

    rates: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds + 1):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r:  # round 0 warms up
                rates[name].append(n / dt)
        if r:
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f} items/s" for k, v in rates.items()), flush=True)
    print()
    print("| contender | items/s (median) | jojo / contender: median of per-round ratios (range) |")
    print("|---|---:|---:|")
    out = {}
    for name, values in rates.items():
        ratios = [a / b for a, b in zip(rates["jojo"], values)]
        cell = "" if name == "jojo" else f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}x)"
        print(f"| {name} | {statistics.median(values):.1f} | {cell} |")
        out[name] = {"items_per_s": values, "ratios": ratios}
    (work / "throughput.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
