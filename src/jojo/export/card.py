"""The model card (README.md) written beside exported weights: what the model is, what it was trained on,
how far it got, and how to load it. Everything comes from the checkpoint's config.json and state.json and,
when the checkpoint sits in a run directory, from its metrics.jsonl and loss.png."""

from __future__ import annotations

import json
from pathlib import Path

from jojo.export.arch import export_arch
from jojo.tokenizer import Tokenizer


def find_run_dir(arg: str | Path, ckpt_dir: Path) -> Path | None:
    """The run directory of a checkpoint: the argument itself when it is one, else the checkpoint's parent
    when that holds a run's metrics or plot."""
    arg = Path(arg)
    for cand in (arg, ckpt_dir.parent):
        if (cand / "metrics.jsonl").is_file() or (cand / "loss.png").is_file():
            return cand
    return None


def plot_path(run_dir: Path | None) -> Path | None:
    if run_dir is not None and (run_dir / "loss.png").is_file():
        return run_dir / "loss.png"
    return None


def _last_train_loss(run_dir: Path | None, step: int | None) -> float | None:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return None
    loss = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("event") == "train" and "loss" in row and (step is None or row.get("step", 0) <= step):
            loss = row["loss"]
    return loss


def _dataset_line(state: dict) -> str:
    dataset = (state.get("run_config") or {}).get("data", {}).get("dataset")
    if state.get("imported_from"):
        return f"imported from `{state['imported_from']}` ({state.get('source_format', 'transformers')})"
    if not dataset:
        return "unknown (the checkpoint does not record it)"
    line = f"`{dataset}`"
    meta_path = Path(dataset) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        source = meta.get("source")
        tokens = sum(s.get("tokens", 0) for s in meta.get("splits", {}).values())
        if source:
            line += f" (source: {'Jojo embedded synthetic corpus' if source == 'embedded' else source}"
            line += f", {tokens:,} tokens)" if tokens else ")"
    except (OSError, ValueError, AttributeError):
        pass
    return line


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _architecture_rows(model, tok: Tokenizer, dtype: str) -> list[tuple[str, object]]:
    cfg = model.config
    arch = export_arch(cfg)
    hf_class = "GPT2LMHeadModel" if arch == "gpt2" else "LlamaForCausalLM"
    heads = cfg.n_head if cfg.n_kv_head == cfg.n_head else f"{cfg.n_head} ({cfg.n_kv_head} KV heads)"
    return [
        ("family", f"{cfg.family} (transformers `{hf_class}`)"),
        ("parameters", f"{model.num_params():,} ({model.num_params(non_embedding=True):,} non-embedding)"),
        ("layers", cfg.n_layer),
        ("embedding size", cfg.n_embd),
        ("attention heads", heads),
        ("MLP hidden size", f"{cfg.mlp_hidden} ({'GELU' if arch == 'gpt2' else 'SwiGLU'})"),
        ("context length", cfg.block_size),
        ("vocabulary", f"{tok.vocab_size:,} tokens (byte-level BPE), embedding padded to {cfg.vocab_size:,}"),
        ("positions", "learned absolute" if arch == "gpt2" else f"RoPE (theta {cfg.rope_theta:g})"),
        ("tied input/output embeddings", "yes" if cfg.tie_embeddings else "no"),
        ("weights dtype", dtype),
    ]


def _training_rows(state: dict, run_dir: Path | None) -> list[tuple[str, object]]:
    step = state.get("step")
    rows = [
        ("training data", _dataset_line(state)),
        ("optimizer steps", _fmt(step)),
        ("tokens seen", _fmt(state.get("tokens_seen"))),
        ("final train loss", _fmt(_last_train_loss(run_dir, step))),
        ("final validation loss", _fmt(state.get("val_loss"))),
        ("best validation loss", _fmt(state.get("best_val_loss"))),
    ]
    if state.get("val_bpb") is not None:
        rows.append(("validation bits per byte", _fmt(state["val_bpb"])))
    return rows


def _table(rows: list[tuple[str, object]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _usage_lines(where: str, repo_id: str | None, gguf_file: str | None) -> list[str]:
    lines = [
        "## Use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{where}")',
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        'messages = [{"role": "user", "content": "Tell me a story."}]',
        "inputs = tok.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        "out = model.generate(**inputs, max_new_tokens=100, do_sample=True, temperature=0.8)",
        'print(tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        'Plain text works too: `tok(text, return_tensors="pt")`. The chat template is ChatML '
        "(`<|im_start|>role\\ncontent<|im_end|>\\n`); generation stops at `<|endoftext|>` or `<|im_end|>`.",
        "",
        "Back into Jojo, to continue training or fine-tune:",
        "",
        "```bash",
        f"jojo import hf {where if not repo_id else 'LOCAL_COPY_OF_THIS_REPO'} runs/imported",
        "jojo generate runs/imported --prompt 'Once upon a time'",
        "```",
        "",
    ]
    if gguf_file:
        lines += [
            "## llama.cpp / Ollama",
            "",
            f"`{gguf_file}` holds the same weights for llama.cpp:",
            "",
            "```bash",
            f"llama-cli -m {gguf_file} -p 'Once upon a time' -n 100",
            "```",
            "",
        ]
    return lines


def model_card(
    model,
    tok: Tokenizer,
    state: dict,
    ckpt_dir: Path,
    run_dir: Path | None,
    has_plot: bool,
    dtype: str,
    repo_id: str | None = None,
    gguf_file: str | None = None,
) -> str:
    """README.md of an exported folder: front matter, architecture, training, the loss plot, how to use it."""
    cfg = model.config
    where = repo_id or "PATH_TO_THIS_FOLDER"
    name = repo_id.split("/")[-1] if repo_id else f"jojo-{cfg.family}-{model.num_params() / 1e6:.1f}M"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- jojo",
        f"- {cfg.family}",
        "- text-generation",
        "---",
        "",
        f"# {name}",
        "",
        f"A {cfg.family}-family language model trained from scratch with Jojo "
        f"(checkpoint `{ckpt_dir.name}`). It loads in `transformers` with no custom code.",
        "",
        "## Architecture",
        "",
        _table(_architecture_rows(model, tok, dtype)),
        "## Training",
        "",
        _table(_training_rows(state, run_dir)),
    ]
    if has_plot:
        lines += ["![training and validation loss](loss.png)", ""]
    lines += [
        "Losses are mean cross-entropy in nats per token with this model's tokenizer: comparable only between "
        "models that share it.",
        "",
        *_usage_lines(where, repo_id, gguf_file),
    ]
    return "\n".join(lines)
