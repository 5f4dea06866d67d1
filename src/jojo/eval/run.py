"""`jojo eval CKPT`: every evaluation of one checkpoint, as a table and a JSON report.

`evaluate_checkpoint(checkpoint, *, tasks=None, ...) -> dict` is what the command calls; `format_report(report)`
renders the table. Parts (names for `tasks`):

- `lm`: language-model metrics (`jojo.eval.lm`) on a prepared split (`data` + `split`) or raw files (`text`).
  With neither, the split of the dataset the checkpoint was trained on, when that folder is still there. On a
  prepared split the defaults are the run's own validation settings (`data.batch_size` rows per batch,
  `logging.eval_iters` batches; `max_batches=0` = the whole split), so `bpb` equals the `val_bpb` the training
  loop logged for this checkpoint.
- the zero-shot tasks of `jojo.eval.tasks` (hellaswag, arc-easy, arc-challenge, piqa, winogrande, lambada);
  `chat=True` scores the multiple-choice ones through the chat template.
- `chat`: exact match on `chat_data` (a JSONL of conversations ending with the reference answer; `jojo.eval.chat`).
- `generation`: samples with distinct-n and repetition rate, and prefill / decode speed (`jojo.eval.gen`).

`tasks=None`: `lm` when there is held-out text, every zero-shot task whose data is in the data folder, `chat`
when `chat_data` is given and `generation` when `generate` is set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from jojo.checkpoint import load_checkpoint, resolve_checkpoint
from jojo.data.prepare import META_FILE
from jojo.device import pick_device, pick_dtype
from jojo.errors import JojoError
from jojo.eval import tasks as zs
from jojo.eval.chat import chat_exact_match
from jojo.eval.gen import generation_quality, generation_speed
from jojo.eval.lm import evaluate_split, evaluate_text

EXTRA_PARTS = ("lm", "chat", "generation")


def _part_names(names) -> list[str]:
    known = {**{p: p for p in EXTRA_PARTS}, **zs.TASKS}
    out = []
    for name in zs.split_names(names):
        spec = zs.task_spec(name, known)
        out.append(spec if isinstance(spec, str) else spec.name)
    return list(dict.fromkeys(out))


def _run_dataset(state: dict) -> Path | None:
    """The prepared dataset the checkpoint was trained on, when it is still there."""
    dataset = ((state.get("run_config") or {}).get("data") or {}).get("dataset")
    if dataset and dataset != "embedded" and (Path(dataset) / META_FILE).is_file():
        return Path(dataset)
    return None


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    tasks=None,
    limit: int = 0,
    data: str | Path | None = None,
    split: str = "val",
    text: str | Path | None = None,
    text_format: str = "auto",
    split_on: str = "auto",
    field: str | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    data_dir: str | Path | None = None,
    chat: bool = False,
    chat_data: str | Path | None = None,
    generate: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> dict:
    """Evaluate one checkpoint (see the module docstring); returns the report."""
    if limit < 0:
        raise JojoError("--limit must be >= 0")
    if batch_size is not None and batch_size < 1:
        raise JojoError("--batch-size must be >= 1")
    if data and text:
        raise JojoError("give either --data DIR (a prepared split) or --text PATH (raw files), not both")
    t0 = time.time()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    ckpt = resolve_checkpoint(checkpoint)
    model, tok, state = load_checkpoint(ckpt, dev)
    run_cfg = state.get("run_config") or {}
    lm_data = Path(data) if data else None
    if lm_data is None and text is None:
        lm_data = _run_dataset(state)
    folder = zs.resolve_data_dir(data_dir)
    parts = _plan_parts(tasks, bool(lm_data or text), folder, chat, chat_data, generate)
    report: dict = {
        "checkpoint": str(ckpt),
        "step": state.get("step"),
        "model": {
            "family": model.config.family,
            "parameters": model.num_params(),
            "block_size": model.config.block_size,
            "vocab_size": model.config.vocab_size,
        },
        "device": str(dev),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "tasks": {},
    }
    for part in parts:
        say(f"evaluating {part} ...")
        if part == "lm":
            report["lm"] = _lm_metrics(model, tok, run_cfg, lm_data, split, text, text_format, split_on, field,
                                       stride, batch_size, max_batches, dev, torch_dtype)  # fmt: skip
        elif part == "chat":
            if not chat_data:
                raise JojoError("the chat exact match needs --chat-data FILE (a JSONL of conversations with answers)")
            result = chat_exact_match(model, tok, chat_data, limit=limit)
            result["file"] = str(chat_data)
            report["chat"] = result
        elif part == "generation":
            report["generation"] = {**generation_quality(model, tok), "speed": generation_speed(model)}
        else:
            report["tasks"][part] = zs.run_task(
                model, tok, part, data_dir=folder, limit=limit, batch_size=batch_size or 32, device=dev,
                dtype=torch_dtype, chat=chat, progress=progress,
            )  # fmt: skip
    report["seconds"] = round(time.time() - t0, 2)
    return report


def _plan_parts(tasks, have_text: bool, folder: Path, chat: bool, chat_data, generate: bool) -> list[str]:
    """What to evaluate: the tasks asked for, or everything there is data for (lm, each task, chat, generation)."""
    if tasks is None:
        parts = (["lm"] if have_text else []) + [
            n for n in zs.available_tasks(folder) if not (chat and zs.TASKS[n].kind == zs.LANGUAGE_MODEL)
        ]
        parts += ["chat"] if chat_data else []
        parts += ["generation"] if generate else []
    else:
        parts = _part_names(tasks)
        if generate and "generation" not in parts:
            parts.append("generation")
        if chat_data and "chat" not in parts:
            parts.append("chat")
    if not parts:
        raise JojoError(
            f"nothing to evaluate: no --data/--text, and no task data in {folder}; fetch tasks with "
            f"`jojo eval download --tasks hellaswag --out {folder}` or pass --data DIR"
        )
    return parts


def _lm_metrics(model, tok, run_cfg: dict, lm_data, split, text, text_format, split_on, field, stride, batch_size,
                max_batches, dev, torch_dtype) -> dict:  # fmt: skip
    """Loss, perplexity and bits per byte on a prepared split (the run's own batch size and eval_iters unless
    told otherwise) or on raw text files."""
    if lm_data is not None:
        rows = batch_size or (run_cfg.get("data") or {}).get("batch_size") or 8
        batches = max_batches
        if batches is None:
            batches = (run_cfg.get("logging") or {}).get("eval_iters", 0) if stride is None else 0
        return evaluate_split(model, tok, lm_data, split, batch_size=rows, max_batches=batches, stride=stride,
                              device=dev, dtype=torch_dtype)  # fmt: skip
    if text is not None:
        return evaluate_text(model, tok, text, fmt=text_format, split_on=split_on, field=field,
                             batch_size=batch_size or 8, max_batches=max_batches or 0, stride=stride, device=dev,
                             dtype=torch_dtype)  # fmt: skip
    raise JojoError("the lm metrics need held-out text: --data DIR [--split val] or --text PATH")


def report_json(report: dict) -> str:
    """The report as strict JSON (NaN and infinities become null)."""
    import json

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(report), indent=2, ensure_ascii=False) + "\n"


# ---- the table ---------------------------------------------------------------------------------------
def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_report(r: dict) -> str:
    m = r["model"]
    lines = [
        f"checkpoint  {r['checkpoint']} (step {r.get('step', '?')}; {m['family']}, {m['parameters']:,} parameters, "
        f"context {m['block_size']}) on {r['device']}, {r['dtype']}"
    ]
    notes = []
    lm = r.get("lm")
    if lm:
        how = f"{lm['max_batches']} batches" if lm["max_batches"] else "every row"
        window = f"stride {lm['stride']}" if lm.get("stride") else "non-overlapping windows"
        lines.append("")
        lines.append(f"language model on {lm['source']}: {how} of {lm['batch_size']} rows, {window}")
        bpb = f"bpb {_num(lm['bpb'])}"
        if "bytes_per_token" in lm:
            bpb += f" (training's formula: split bytes/token {lm['bytes_per_token']:.3f}; from the scored tokens' "
            bpb += f"bytes {_num(lm['bpb_scored'])})"
        if lm.get("entropy_floor_bpb") is not None:
            bpb += f", entropy floor {_num(lm['entropy_floor_bpb'])}"
        lines.append(f"  loss {_num(lm['loss'])} nats/token   perplexity {_num(lm['perplexity'], 3)}   {bpb}")
        lines.append(f"  top-1 accuracy {100 * lm['accuracy']:.2f}%   {lm['tokens']:,} tokens scored")
    if r["tasks"]:
        lines.append("")
        lines.append(f"{'task':<15}{'metric':<17}{'value':>9}{'stderr':>9}{'n':>7}   chance")
        for name, t in r["tasks"].items():
            metrics = [k for k in ("acc", "acc_norm", "acc_norm_token", "perplexity") if k in t]
            for i, key in enumerate(metrics):
                label = "acc (greedy)" if key == "acc" and "perplexity" in t else key
                if t.get("mode") == "chat" and key == "acc":
                    label = "acc (chat)"
                chance = _num(t.get("chance"), 2) if i == 0 and t.get("chance") is not None else ""
                n = f"{t['n']:,}" if i == 0 else ""
                lines.append(
                    f"{name if i == 0 else '':<15}{label:<17}{_num(t[key]):>9}{_num(t.get(key + '_stderr')):>9}"
                    f"{n:>7}   {chance}"
                )
            if t.get("truncated"):
                notes.append(f"{name}: {t['truncated']} request(s) longer than the context lost their oldest tokens")
    chat = r.get("chat")
    if chat:
        lines.append("")
        kinds = "  ".join(f"{k} {100 * v:.0f}%" for k, v in chat["by_kind"].items())
        lines.append(
            f"chat exact match  {100 * chat['exact_match']:.1f}% ({chat['correct']}/{chat['n']}) on {chat['file']}"
            + (f"   by kind: {kinds}" if kinds else "")
        )
    gen = r.get("generation")
    if gen:
        s = gen["speed"]
        lines.append("")
        lines.append(
            f"generation  distinct-2 {_num(gen['distinct_2'], 3)}   distinct-3 {_num(gen['distinct_3'], 3)}   "
            f"repetition rate {_num(gen['repetition_rate'], 3)}   ({len(gen['samples'])} samples, "
            f"T={gen['temperature']}, top-k {gen['top_k']})"
        )
        lines.append(
            f"speed       prefill {s['prefill_tokens_per_second']:,.0f} tokens/s ({s['prompt_tokens']} tokens), decode "
            f"{s['decode_tokens_per_second']:,.1f} tokens/s, first token {s['time_to_first_token_ms']:.1f} ms, "
            f"peak memory {s['peak_memory_mb']:,.0f} MB ({s['peak_memory_kind']})"
        )
        for sample in gen["samples"][:3]:
            lines.append(f"  > {sample['prompt']}{sample['text']}".replace("\n", " ")[:160])
    if notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in notes)
    lines.append(f"({r['seconds']:.1f} s)")
    return "\n".join(lines)
