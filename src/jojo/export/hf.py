"""Hugging Face `transformers` folders: export a Jojo checkpoint, import a GPT-2 or Llama folder.

The weights map one to one through name tables, with two layout differences:

- gpt2:  HF's GPT-2 uses `Conv1D`, whose weight is [in, out]: every matrix in a block is transposed. Our `qkv`
         Linear is exactly HF's `c_attn` (q, k, v concatenated). HF's GPT-2 always has biases; a bias-free Jojo
         model exports zeros, and a folder whose biases are all zero imports as bias-free, so the round trip
         gives back the same config.
- llama: our `qkv` is HF's q_proj, k_proj and v_proj stacked. Both use the rotate-half RoPE layout, so no
         permutation is needed (llama.cpp's interleaved layout is handled in `jojo.export.gguf`).

A vocabulary padded above the tokenizer's size (a multiple of 64, for fast matmuls) is kept: config.json has
the padded size and generation_config.json suppresses the padding ids, so `generate` never samples them
(Jojo's engine masks them the same way).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch

from jojo.config import ModelConfig, read_json
from jojo.errors import JojoError, annotate, ensure_dir
from jojo.export.arch import export_arch
from jojo.tokenizer import CHAT_TEMPLATE_JINJA, EOT, SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
HF_WEIGHTS = "model.safetensors"

# (Jojo name, HF name, transposed) for every tensor that is not split. Bias rows are dropped for models without
# biases (llama) or filled with zeros (gpt2, whose HF class always has them).
_GPT2_GLOBAL = (
    ("wte.weight", "transformer.wte.weight", False),
    ("wpe.weight", "transformer.wpe.weight", False),
    ("norm_f.weight", "transformer.ln_f.weight", False),
    ("norm_f.bias", "transformer.ln_f.bias", False),
)
_GPT2_LAYER = (
    ("norm1.weight", "ln_1.weight", False),
    ("norm1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("norm2.weight", "ln_2.weight", False),
    ("norm2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
)
_LLAMA_GLOBAL = (
    ("wte.weight", "model.embed_tokens.weight", False),
    ("norm_f.weight", "model.norm.weight", False),
)
_LLAMA_LAYER = (
    ("norm1.weight", "input_layernorm.weight", False),
    ("attn.proj.weight", "self_attn.o_proj.weight", False),
    ("attn.proj.bias", "self_attn.o_proj.bias", False),
    ("norm2.weight", "post_attention_layernorm.weight", False),
    ("mlp.gate.weight", "mlp.gate_proj.weight", False),
    ("mlp.gate.bias", "mlp.gate_proj.bias", False),
    ("mlp.up.weight", "mlp.up_proj.weight", False),
    ("mlp.up.bias", "mlp.up_proj.bias", False),
    ("mlp.proj.weight", "mlp.down_proj.weight", False),
    ("mlp.proj.bias", "mlp.down_proj.bias", False),
)
_LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# Buffers some HF versions saved with the weights; they carry no parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def name_table(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(Jojo name, HF name, transposed) for every tensor mapped one to one (llama's qkv is split apart)."""
    if export_arch(cfg) == "gpt2":
        glob, layer, prefix = _GPT2_GLOBAL, _GPT2_LAYER, "transformer.h"
    else:
        glob, layer, prefix = _LLAMA_GLOBAL, _LLAMA_LAYER, "model.layers"
    keep_bias = export_arch(cfg) == "gpt2" or cfg.bias
    rows = [r for r in glob if keep_bias or not r[0].endswith(".bias")]
    for i in range(cfg.n_layer):
        rows += [
            (f"blocks.{i}.{a}", f"{prefix}.{i}.{b}", t) for a, b, t in layer if keep_bias or not a.endswith(".bias")
        ]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight", False))
    return rows


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]


# ---- state dicts ------------------------------------------------------------------------------------------
def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Jojo state dict -> HF state dict (same dtype; tied head omitted, as `save_pretrained` does)."""

    def get(name: str) -> torch.Tensor:
        if name in sd:
            return sd[name]
        if name.endswith(".bias"):  # a bias-free Jojo gpt2: HF's Conv1D/LayerNorm always have a bias
            weight = sd[name[: -len("bias")] + "weight"]
            return torch.zeros(weight.shape[0], dtype=weight.dtype)
        raise JojoError(f"checkpoint lacks tensor {name}; it does not match its config")

    out = {hf: (get(ours).t() if transposed else get(ours)) for ours, hf, transposed in name_table(cfg)}
    if export_arch(cfg) == "llama":
        for i in range(cfg.n_layer):
            kinds = ("weight", "bias") if cfg.bias else ("weight",)
            for kind in kinds:
                parts = get(f"blocks.{i}.attn.qkv.{kind}").split(_qkv_sizes(cfg), dim=0)
                for hf, part in zip(_LLAMA_QKV, parts):
                    out[f"model.layers.{i}.{hf}.{kind}"] = part
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict -> Jojo state dict for `cfg`. Unknown tensors are an error, so nothing is silently lost.

    Biases that `cfg` has but the folder lacks (a Llama with attention_bias but not mlp_bias) are zeros."""
    hf = dict(hf)
    out: dict[str, torch.Tensor] = {}

    def take(name: str, size: int | None = None) -> torch.Tensor:
        if name in hf:
            return hf.pop(name)
        if name.endswith(".bias") and size is not None:
            return torch.zeros(size)
        raise JojoError(f"the Hugging Face weights lack {name}; is the folder complete?")

    def bias_size(ours: str) -> int | None:
        if not ours.endswith(".bias"):
            return None
        w = out.get(ours[: -len("bias")] + "weight")
        return w.shape[0] if w is not None else None

    for ours, name, transposed in name_table(cfg):
        if ours.endswith(".bias") and not cfg.bias:  # gpt2 folder with all-zero biases -> bias-free Jojo model
            hf.pop(name, None)
            continue
        t = take(name, size=bias_size(ours))
        out[ours] = t.t().contiguous() if transposed else t
    if export_arch(cfg) == "llama":
        for i in range(cfg.n_layer):
            kinds = ("weight", "bias") if cfg.bias else ("weight",)
            for kind in kinds:
                parts = [take(f"model.layers.{i}.{n}.{kind}", size=s) for n, s in zip(_LLAMA_QKV, _qkv_sizes(cfg))]
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some folders store the tied head anyway
    leftover = [k for k in hf if not k.endswith(_IGNORED_SUFFIXES)]
    if leftover:
        raise JojoError(
            f"the Hugging Face weights hold tensors Jojo's {cfg.family} has no place for: {leftover[:3]}"
            f"{' ...' if len(leftover) > 3 else ''}; the architecture differs from config.json"
        )
    return out


# ---- configs ------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for GPT2LMHeadModel / LlamaForCausalLM. Written by hand so export needs no transformers."""
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tok.eot_id,
        "eos_token_id": tok.eot_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if export_arch(cfg) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden,
            "activation_function": "gelu_new",  # tanh-approximated GELU, as ours
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "pretraining_tp": 1,
        **common,
    }


def model_config_from_hf(c: dict, has_bias: bool, block_size: int | None = None) -> ModelConfig:
    """ModelConfig from a HF config.json of model_type gpt2 or llama; refuses features Jojo does not model."""
    model_type = c.get("model_type")

    def need(key: str):
        if key not in c:
            raise JojoError(f"the Hugging Face config.json lacks '{key}'")
        return c[key]

    def unsupported(what: str) -> JojoError:
        return JojoError(f"this {model_type} model uses {what}, which Jojo's {model_type} family does not support")

    if model_type == "gpt2":
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise unsupported(f"activation {c['activation_function']!r}")
        if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
            raise unsupported("non-standard attention scaling")
        if c.get("add_cross_attention", False):
            raise unsupported("cross-attention")
        n_embd = need("n_embd")
        native = need("n_positions")
        kw = dict(
            family="gpt2",
            n_layer=need("n_layer"),
            n_head=need("n_head"),
            n_embd=n_embd,
            mlp_hidden=c.get("n_inner") or 4 * n_embd,
            norm_eps=c.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=c.get("tie_word_embeddings", True),
            dropout=c.get("attn_pdrop", 0.0) or 0.0,
        )
    elif model_type == "llama":
        if c.get("hidden_act", "silu") != "silu":
            raise unsupported(f"activation {c['hidden_act']!r}")
        rope = c.get("rope_parameters") or {}
        scaling = c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise unsupported(f"RoPE scaling {rope_type!r}")
        n_embd, n_head = need("hidden_size"), need("num_attention_heads")
        if c.get("head_dim") not in (None, n_embd // n_head):
            raise unsupported(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads")
        native = need("max_position_embeddings")
        kw = dict(
            family="llama",
            n_layer=need("num_hidden_layers"),
            n_head=n_head,
            n_kv_head=c.get("num_key_value_heads") or n_head,
            n_embd=n_embd,
            mlp_hidden=need("intermediate_size"),
            norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0),
            tie_embeddings=c.get("tie_word_embeddings", False),
            dropout=c.get("attention_dropout", 0.0) or 0.0,
        )
    else:
        arch = (c.get("architectures") or ["?"])[0]
        raise JojoError(
            f"unsupported model type {model_type!r} ({arch}); Jojo imports GPT-2 (GPT2LMHeadModel) and "
            "Llama (LlamaForCausalLM) folders"
        )
    if block_size is not None and not 0 < block_size <= native:
        raise JojoError(f"--block-size must be in 1..{native} (the model's trained context)")
    return ModelConfig(vocab_size=need("vocab_size"), block_size=block_size or native, bias=has_bias, **kw)


def tokenizer_config(cfg: ModelConfig, tok: Tokenizer) -> dict:
    """tokenizer_config.json: the fast tokenizer as is, our special tokens and the ChatML template."""
    data = json.loads(tok.to_json())
    added = {
        str(t["id"]): {
            "content": t["content"],
            "lstrip": t.get("lstrip", False),
            "normalized": t.get("normalized", False),
            "rstrip": t.get("rstrip", False),
            "single_word": t.get("single_word", False),
            "special": t.get("special", True),
        }
        for t in data.get("added_tokens", [])
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode exactly as Jojo does
        "model_max_length": cfg.block_size,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE_JINJA,
    }


def generation_config(cfg: ModelConfig, tok: Tokenizer) -> dict:
    """Stop at <|endoftext|> (documents) and <|im_end|> (chat turns); never emit vocabulary padding."""
    out = {
        "bos_token_id": tok.eot_id,
        "eos_token_id": [tok.eot_id, tok.im_end_id],
        "pad_token_id": tok.eot_id,
    }
    if cfg.vocab_size > tok.vocab_size:
        out["suppress_tokens"] = list(range(tok.vocab_size, cfg.vocab_size))
    return out


# ---- files --------------------------------------------------------------------------------------------------
def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def new_output_dir(out: str | Path) -> tuple[Path, Path]:
    """(final, tmp): write into tmp, then `finish_output_dir`, so a crash leaves no half-written folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JojoError(f"{out} already exists and is not empty; remove it or choose another output folder")
    ensure_dir(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as exc:  # name the folder the user asked for, not the temporary one beside it
        annotate(exc, doing=f"creating {out}", path=out.parent)
        raise
    return out, tmp


def finish_output_dir(tmp: Path, out: Path) -> Path:
    os.replace(tmp, out)  # also replaces an empty directory
    return out


def write_hf_folder(model, tok: Tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """Weights, config, generation config and tokenizer files of a transformers folder."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf = {k: v.to(dtype).contiguous().clone() for k, v in to_hf_state_dict(sd, cfg).items()}
    save_file(hf, str(folder / HF_WEIGHTS), metadata={"format": "pt"})
    _json(folder / "config.json", hf_config(cfg, tok, dtype))
    _json(folder / "generation_config.json", generation_config(cfg, tok))
    (folder / TOKENIZER_FILE).write_text(tok.to_json())
    _json(folder / "tokenizer_config.json", tokenizer_config(cfg, tok))
    _json(folder / "special_tokens_map.json", {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT})


def export_hf(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    repo_id: str | None = None,
    gguf_type: str | None = None,
) -> Path:
    """Checkpoint (or run dir) -> a transformers folder with a model card (and a .gguf beside the weights
    when gguf_type is given). Returns the folder."""
    from jojo.checkpoint import load_checkpoint, resolve_checkpoint
    from jojo.export.card import find_run_dir, model_card, plot_path

    if dtype not in DTYPES:
        raise JojoError(f"invalid --dtype {dtype!r}; allowed values: {', '.join(DTYPES)}")
    ckpt_dir = resolve_checkpoint(ckpt)
    model, tok, state = load_checkpoint(ckpt_dir)
    out, tmp = new_output_dir(out)
    try:
        write_hf_folder(model, tok, tmp, DTYPES[dtype])
        run_dir = find_run_dir(ckpt, ckpt_dir)
        plot = plot_path(run_dir)
        if plot is not None:
            shutil.copyfile(plot, tmp / "loss.png")
        gguf_file = None
        if gguf_type is not None:
            from jojo.export.gguf import write_gguf

            name = repo_id.split("/")[-1] if repo_id else out.name
            gguf_file = f"{name}-{gguf_type}.gguf"
            write_gguf(model, tok, tmp / gguf_file, gguf_type, name)
        card = model_card(
            model, tok, state, ckpt_dir, run_dir, plot is not None, dtype, repo_id=repo_id, gguf_file=gguf_file
        )
        (tmp / "README.md").write_text(card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_output_dir(tmp, out)


# ---- import -------------------------------------------------------------------------------------------------
def safe_torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch weights file, unpickled with weights_only=True: plain tensors load, code never runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise JojoError(
            f"refusing to load {path}: it is not a plain tensor file, and unpickling it could run arbitrary code "
            f"({reason}); convert it to safetensors with a tool you trust"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise JojoError(f"{path} does not hold a flat dict of tensors")
    return obj


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: safetensors (single or sharded) first, else pytorch_model*.bin loaded safely."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def shards(single: str, index: str, pattern: str) -> list[Path]:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = read_json(folder / index, "weights index").get("weight_map", {})
            return [folder / f for f in sorted(set(weight_map.values()))]
        return sorted(folder.glob(pattern))

    weights: dict[str, torch.Tensor] = {}
    files = shards(HF_WEIGHTS, "model.safetensors.index.json", "model*.safetensors")
    if files:
        for f in files:
            try:
                weights.update(load_file(str(f)))
            except (SafetensorError, OSError) as exc:
                raise JojoError(f"cannot read {f}: {exc}") from None
        return weights
    files = shards("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if not files:
        raise JojoError(f"{folder} holds no model.safetensors or pytorch_model.bin; is it a transformers folder?")
    for f in files:
        weights.update(safe_torch_load(f))
    return weights


def _normalise_names(weights: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Folders saved from the base class (GPT2Model, LlamaModel) lack the 'transformer.' / 'model.' prefix."""
    prefix = "transformer." if model_type == "gpt2" else "model."
    if any(k.startswith(prefix) for k in weights):
        return weights
    return {k if k.startswith("lm_head.") else prefix + k: v for k, v in weights.items()}


def hf_tokenizer_with_specials(path: Path) -> tuple[Tokenizer, list[str]]:
    """Load a tokenizer.json and make Jojo's special tokens atomic special tokens, adding those it lacks.

    Adding appends new ids (or reuses the id of a vocabulary entry with the same text); if any existing id
    would change, the tokenizer is refused rather than silently re-numbered."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    if not path.is_file():
        raise JojoError(
            f"{path.parent} has no {TOKENIZER_FILE}; Jojo needs the fast tokenizer file "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes it)"
        )
    try:
        raw = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise JojoError(f"cannot read tokenizer {path}: {str(exc).splitlines()[0]}") from None
    before = raw.get_vocab(with_added_tokens=True)
    specials = {t.content for t in raw.get_added_tokens_decoder().values() if t.special}
    todo = [s for s in SPECIAL_TOKENS if s not in specials]
    if todo:
        raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in todo])
        after = raw.get_vocab(with_added_tokens=True)
        moved = [t for t, i in before.items() if after.get(t) != i]
        if moved or any(raw.token_to_id(s) is None for s in todo):
            raise JojoError(
                f"cannot add Jojo's special tokens {todo} to {path} without changing existing ids "
                f"({moved[:3]}); add {', '.join(todo)} as special tokens to the tokenizer yourself"
            )
    return Tokenizer(raw, str(path)), todo


def _grow_vocab(sd: dict[str, torch.Tensor], cfg: ModelConfig, size: int) -> ModelConfig:
    """Append embedding (and head) rows up to `size` padded to a multiple of 64; new rows are the mean row,
    a neutral start for tokens the model has never seen."""
    padded = 64 * math.ceil(size / 64)
    for name in ("wte.weight", "lm_head.weight"):
        if name in sd:
            w = sd[name]
            sd[name] = torch.cat([w, w.mean(0, keepdim=True).expand(padded - w.shape[0], -1)])
    return dataclasses.replace(cfg, vocab_size=padded)


def import_hf(src: str | Path, out: str | Path, block_size: int | None = None) -> Path:
    """A local transformers folder (GPT-2 or Llama, with tokenizer.json) -> a Jojo run dir holding one
    checkpoint (step 0), ready for `jojo train --init-from`, `jojo generate` or export. Returns the checkpoint."""
    from jojo.checkpoint import load_weights, write_checkpoint
    from jojo.model import GPT

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise JojoError(f"Hugging Face folder not found: {src}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JojoError(f"{out} already exists and is not empty; choose another output folder")
    c = read_json(src / "config.json", "Hugging Face config")
    model_type = c.get("model_type")
    model_config_from_hf(c, False, block_size)  # validate the architecture before reading any weights
    tok, added = hf_tokenizer_with_specials(src / TOKENIZER_FILE)
    weights = _normalise_names(read_hf_weights(src), model_type)
    if model_type == "gpt2":
        bias_names = [n for _, n, _ in name_table(model_config_from_hf(c, True)) if n.endswith(".bias")]
        has_bias = any(bool(weights[n].any()) for n in bias_names if n in weights)
    else:
        has_bias = bool(c.get("attention_bias")) or bool(c.get("mlp_bias"))
    cfg = model_config_from_hf(c, has_bias, block_size)
    sd = from_hf_state_dict(weights, cfg)
    if "wpe.weight" in sd:
        sd["wpe.weight"] = sd["wpe.weight"][: cfg.block_size]
    if tok.vocab_size > cfg.vocab_size:
        cfg = _grow_vocab(sd, cfg, tok.vocab_size)
    model = GPT(cfg)
    load_weights(model, sd, str(src))
    state = {"imported_from": str(src.resolve()), "source_format": f"transformers-{model_type}"}
    if added:
        state["added_special_tokens"] = added
    return write_checkpoint(out, 0, model, tok, state, keep_last=1)
