"""GGUF export for llama.cpp and Ollama, written with the `gguf` package (the one llama.cpp's converter uses).

Tensor names and layouts follow llama.cpp's `convert_hf_to_gguf.py`:

- Every matrix is stored as an nn.Linear weight, [out, in] in numpy order (GGUF's ne = [in, out]).
- llama: q and k rows are permuted from the rotate-half RoPE layout (ours and Hugging Face's) to the
  interleaved-pairs layout llama.cpp's LLAMA architecture rotates: row 2i <- row i, row 2i+1 <- row i+half.
- gpt2: one fused attn_qkv (exactly our qkv), learned position_embd, and biases everywhere (zeros for a
  bias-free Jojo model, since llama.cpp's GPT-2 graph requires them); the output matrix is always written, as
  the converter does, so builds that do not fall back to token_embd still load it.
- Types: 1-D tensors (norms, biases) and position_embd stay f32; matrices become f16 or q8_0 (q8_0 falls back
  to f16 for a matrix whose rows are not a multiple of 32, like the converter).

The tokenizer is the byte-level BPE itself (tokenizer.ggml.model "gpt2", pre-tokenizer "gpt-2", which is the
GPT-2 regex ours uses), with its merges, special tokens as CONTROL, vocabulary padding as UNUSED [PADn] tokens,
and the ChatML template in tokenizer.chat_template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from jojo.config import ModelConfig
from jojo.errors import JojoError, ensure_dir
from jojo.export.arch import export_arch
from jojo.tokenizer import CHAT_TEMPLATE_JINJA, Tokenizer

GGUF_TYPES = ("f32", "f16", "q8_0")


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half rows -> interleaved-pair rows, per head (weights [out, in] or biases [out])."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) in llama.cpp's names and layouts, in file order."""

    def get(name: str) -> torch.Tensor:
        if name in sd:
            return sd[name].float()
        weight = sd[name[: -len("bias")] + "weight"]  # bias-free gpt2: llama.cpp wants zeros
        return torch.zeros(weight.shape[0])

    out = [("token_embd.weight", get("wte.weight"))]
    if export_arch(cfg) == "gpt2":
        out.append(("position_embd.weight", get("wpe.weight")))
        for i in range(cfg.n_layer):
            b, p = f"blocks.{i}.", f"blk.{i}."
            for ours, theirs in (
                ("norm1", "attn_norm"),
                ("attn.qkv", "attn_qkv"),
                ("attn.proj", "attn_output"),
                ("norm2", "ffn_norm"),
                ("mlp.fc", "ffn_up"),
                ("mlp.proj", "ffn_down"),
            ):
                out += [
                    (p + theirs + ".weight", get(b + ours + ".weight")),
                    (p + theirs + ".bias", get(b + ours + ".bias")),
                ]
        out += [("output_norm.weight", get("norm_f.weight")), ("output_norm.bias", get("norm_f.bias"))]
        out.append(("output.weight", get("lm_head.weight")))
        return out
    sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        b, p = f"blocks.{i}.", f"blk.{i}."
        out.append((p + "attn_norm.weight", get(b + "norm1.weight")))
        for kind in kinds:
            q, k, v = get(f"{b}attn.qkv.{kind}").split(sizes, dim=0)
            out += [
                (f"{p}attn_q.{kind}", _permute_rope(q, cfg.n_head)),
                (f"{p}attn_k.{kind}", _permute_rope(k, cfg.n_kv_head)),
                (f"{p}attn_v.{kind}", v),
            ]
        out += [(f"{p}attn_output.{kind}", get(f"{b}attn.proj.{kind}")) for kind in kinds]
        out.append((p + "ffn_norm.weight", get(b + "norm2.weight")))
        for ours, theirs in (("mlp.gate", "ffn_gate"), ("mlp.up", "ffn_up"), ("mlp.proj", "ffn_down")):
            out += [(f"{p}{theirs}.{kind}", get(f"{b}{ours}.{kind}")) for kind in kinds]
    out.append(("output_norm.weight", get("norm_f.weight")))
    if not cfg.tie_embeddings:  # llama.cpp uses token_embd when output is absent
        out.append(("output.weight", get("lm_head.weight")))
    return out


def gguf_vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE, padded to the model's vocab size."""
    from gguf import TokenType

    data = json.loads(tok.to_json())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    # llama.cpp's "gpt-2" pre-tokenizer is GPT-2's regex: only a tokenizer that splits text the same way can
    # claim it (Llama 3's or Qwen's byte-level BPEs use other regexes, and sentencepiece-style ones no bytes).
    gpt2_style = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    if model.get("type") != "BPE" or not gpt2_style or data.get("normalizer") is not None:
        raise JojoError(
            "GGUF export supports byte-level BPE tokenizers with GPT-2's pre-tokenization (as `jojo tokenizer "
            f"train` makes); this one is {model.get('type')} with pre-tokenizer {pre.get('type')}"
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for t in data.get("added_tokens", []):
        tokens[t["id"]] = t["content"]
        types[t["id"]] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _encode(name: str, t: torch.Tensor, qtype: str):
    """-> (array, raw GGML type): 1-D tensors and position_embd stay f32, as llama.cpp's converter keeps them."""
    from gguf import GGMLQuantizationType, quants

    arr = t.detach().cpu().float().numpy()
    if qtype == "f32" or arr.ndim == 1 or name == "position_embd.weight":
        return arr, GGMLQuantizationType.F32
    if qtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return quants.quantize(arr, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return arr.astype(np.float16), GGMLQuantizationType.F16


def write_gguf(model, tok: Tokenizer, path: Path, qtype: str, name: str) -> None:
    import gguf

    if qtype not in GGUF_TYPES:
        raise JojoError(f"invalid --type {qtype!r}; allowed values: {', '.join(GGUF_TYPES)}")
    cfg: ModelConfig = model.config
    arch = export_arch(cfg)  # llama.cpp's architecture names are "gpt2" and "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    w.add_file_type(gguf.LlamaFileType[file_types[qtype]])
    if qtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_vocab_size(cfg.vocab_size)
    if export_arch(cfg) == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    w.add_eot_token_id(tok.im_end_id)
    w.add_pad_token_id(tok.eot_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE_JINJA)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for tname, tensor in gguf_tensors(sd, cfg):
        arr, raw = _encode(tname, tensor, qtype)
        w.add_tensor(tname, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(ckpt: str | Path, out: str | Path, qtype: str = "f16") -> Path:
    """Checkpoint (or run dir) -> one .gguf file, written to a temporary name and renamed."""
    from jojo.checkpoint import load_checkpoint, resolve_checkpoint

    if qtype not in GGUF_TYPES:
        raise JojoError(f"invalid --type {qtype!r}; allowed values: {', '.join(GGUF_TYPES)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise JojoError("GGUF export needs the gguf package: pip install 'jojo[export]'") from None
    ckpt_dir = resolve_checkpoint(ckpt)
    model, tok, _ = load_checkpoint(ckpt_dir)
    out = Path(out)
    if out.is_dir():
        raise JojoError(f"{out} is a directory; give the path of the .gguf file to write")
    ensure_dir(out.parent)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    name = f"jojo-{model.config.family}-{ckpt_dir.name}"
    try:
        write_gguf(model, tok, tmp, qtype, name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
