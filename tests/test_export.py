"""Export/import parity: Jojo <-> transformers (logits, greedy tokens, chat template, bit-exact round trip),
GGUF layout and metadata, safe loading, and the Hub upload's failure paths. Tiny models, CPU, no downloads."""

from __future__ import annotations

import json
import os
import pickle
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jojo.checkpoint import load_checkpoint, load_optimizer_state, resolve_checkpoint, write_checkpoint
from jojo.config import ModelConfig
from jojo.errors import JojoError
from jojo.export.hf import export_hf, hf_config, import_hf, to_hf_state_dict
from jojo.infer.engine import SamplingConfig, generate
from jojo.model import GPT
from jojo.tokenizer import CHAT_TEMPLATE_JINJA, EOT, IM_END, IM_START, render_chat, train_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "mat", "tree", "house"]
WORDS += ["red", "blue", "big", "small", "happy", "café", "naïve", "42", "7"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", " :)", "\n"]))
    return out


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sentences(400), 400)


VARIANTS = {
    # name: (family, extra config); vocab padded to a multiple of 64 above the tokenizer's size
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {"n_kv_head": 2}),  # grouped-query attention, untied head
    "gpt2-nobias": ("gpt2", {"bias": False}),
    "llama-bias-tied": ("llama", {"bias": True, "tie_embeddings": True}),
}


def make_model(tok, family: str, **kw) -> GPT:
    torch.manual_seed(0)
    vocab = 64 * -(-tok.vocab_size // 64)
    cfg = ModelConfig(family=family, vocab_size=vocab, block_size=128, n_layer=2, n_head=4, n_embd=64, **kw)
    model = GPT(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def runs(tok, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (family, kw) in VARIANTS.items():
        run = root / name
        write_checkpoint(run, 20, make_model(tok, family, **kw), tok, {"tokens_seen": 5120, "val_loss": 4.5})
        out[name] = run
    # a run directory with a loss curve and metrics, as `jojo train` leaves it
    (out["gpt2"] / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a plot")
    rows = [{"event": "train", "step": 10, "loss": 5.25}, {"event": "train", "step": 20, "loss": 4.75}]
    (out["gpt2"] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def hf_dirs(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: export_hf(run, root / name) for name, run in runs.items()}


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


# ---- Jojo -> transformers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, runs, hf_dirs):
    model, tok, _ = load_checkpoint(runs[name])
    hf, _ = load_hf(hf_dirs[name])
    expected = "GPT2LMHeadModel" if VARIANTS[name][0] == "gpt2" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    x = torch.randint(0, tok.vocab_size, (3, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert ours.shape == theirs.shape == (3, 96, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation_matches_transformers(name, runs, hf_dirs):
    model, tok, _ = load_checkpoint(runs[name])
    hf, _ = load_hf(hf_dirs[name])
    prompt = tok.encode("The cat sat on the mat and")
    stops = {tok.eot_id, tok.im_end_id}
    ours = generate(model, prompt, SamplingConfig(max_tokens=32, temperature=0.0), tok.vocab_size, stop_ids=stops)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    if out and out[-1] in stops:  # transformers returns the eos it stopped at; Jojo does not yield stop ids
        out = out[:-1]
    assert len(ours) >= 16 and ours == out


def test_padding_ids_are_suppressed(runs, hf_dirs, tok):
    hf, _ = load_hf(hf_dirs["llama"])
    cfg = json.loads((hf_dirs["llama"] / "config.json").read_text())
    gen = json.loads((hf_dirs["llama"] / "generation_config.json").read_text())
    assert cfg["vocab_size"] == 64 * -(-tok.vocab_size // 64) > tok.vocab_size  # padded size kept
    assert gen["suppress_tokens"] == list(range(tok.vocab_size, cfg["vocab_size"]))
    assert gen["eos_token_id"] == [tok.eot_id, tok.im_end_id]
    out = hf.generate(
        torch.tensor([tok.encode("A dog")]),
        max_new_tokens=2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert torch.isinf(out.scores[0][0, tok.vocab_size :]).all()


@pytest.mark.parametrize("gen_prompt", [False, True])
def test_chat_template_matches_render_chat(gen_prompt, hf_dirs, tok):
    _, hf_tok = load_hf(hf_dirs["gpt2"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the café? 42!"},
        {"role": "assistant", "content": "Under the tree :)"},
        {"role": "user", "content": "And the naïve dog?"},
    ]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False)
    assert list(ids) == tok.encode(render_chat(messages, add_generation_prompt=gen_prompt))
    assert hf_tok.decode(ids) == render_chat(messages, add_generation_prompt=gen_prompt)
    assert hf_tok.eos_token == EOT and hf_tok.convert_tokens_to_ids(IM_END) == tok.im_end_id


def test_hf_folder_contents_and_model_card(hf_dirs, tok):
    folder = hf_dirs["gpt2"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "README.md", "loss.png"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["tie_word_embeddings"] is True
    assert cfg["activation_function"] == "gelu_new"
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT_TEMPLATE_JINJA and tc["eos_token"] == EOT
    assert {v["content"] for v in tc["added_tokens_decoder"].values()} >= {EOT, IM_START, IM_END}
    card = (folder / "README.md").read_text()
    for piece in ("## Architecture", "## Training", "5,120", "4.5000", "4.7500", "loss.png", "from_pretrained"):
        assert piece in card, piece
    assert "lm_head.weight" not in _safetensors_names(folder / "model.safetensors")  # tied: stored once


def _safetensors_names(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_gpt2_conv1d_layout(runs, hf_dirs):
    """HF's GPT-2 Conv1D weights are [in, out]: ours transposed."""
    from safetensors.torch import load_file

    model, _, _ = load_checkpoint(runs["gpt2"])
    hf = load_file(str(hf_dirs["gpt2"] / "model.safetensors"))
    assert torch.equal(hf["transformer.h.1.attn.c_attn.weight"], model.blocks[1].attn.qkv.weight.t())
    assert torch.equal(hf["transformer.h.0.mlp.c_fc.weight"], model.blocks[0].mlp.fc.weight.t())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_export(dtype, runs, tmp_path):
    from safetensors.torch import load_file

    folder = export_hf(runs["llama"], tmp_path / "hf", dtype=dtype)
    tensors = load_file(str(folder / "model.safetensors"))
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert all(t.dtype == want for t in tensors.values())
    written = json.loads((folder / "config.json").read_text())["torch_dtype"]
    assert written == {"bf16": "bfloat16", "fp16": "float16"}[dtype]


# ---- transformers -> Jojo --------------------------------------------------------------------------------------
def _files_equal(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_import_export_is_bit_exact(name, runs, hf_dirs, tmp_path):
    ckpt = import_hf(hf_dirs[name], tmp_path / "imported")
    original, tok, _ = load_checkpoint(runs[name])
    back, tok2, state = load_checkpoint(ckpt)
    assert back.config == original.config
    assert tok2.hash == tok.hash and state["source_format"].startswith("transformers-")
    sd, sd2 = original.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    again = export_hf(ckpt, tmp_path / "again")
    names = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    _files_equal(hf_dirs[name], again, names)


def test_round_trip_from_bf16_is_exact(runs, tmp_path):
    first = export_hf(runs["llama"], tmp_path / "a", dtype="bf16")
    second = export_hf(import_hf(first, tmp_path / "ckpt"), tmp_path / "b", dtype="bf16")
    _files_equal(first, second, ["model.safetensors", "config.json"])


def test_cli_export_import(runs, tmp_path, capsys):
    from jojo.cli import main

    assert main(["export", "hf", str(runs["llama"]), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert resolve_checkpoint(tmp_path / "back").is_dir()
    assert main(["export", "gguf", str(tmp_path / "back"), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    capsys.readouterr()
    assert main(["export", "hf", str(runs["llama"]), str(tmp_path / "hf")]) == 2  # not empty: refused
    err = capsys.readouterr().err
    assert err.startswith("jojo: error:") and "not empty" in err and err.count("\n") == 1


def _hf_folder(model: GPT, tokenizer_json: str, folder: Path, eot_id: int) -> Path:
    """A transformers folder written by hand (not by export_hf), around any tokenizer.json."""
    from safetensors.torch import save_file

    folder.mkdir()
    sd = {k: v.contiguous().clone() for k, v in to_hf_state_dict(model.state_dict(), model.config).items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    stub = SimpleNamespace(eot_id=eot_id)
    (folder / "config.json").write_text(json.dumps(hf_config(model.config, stub)))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    return folder


def test_import_adds_missing_special_tokens_without_moving_ids(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(sentences(300), trainer=trainer)
    size = raw.get_vocab_size()
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=size, block_size=64, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg).eval()  # vocab exactly the tokenizer's: the new tokens need new rows
    folder = _hf_folder(model, raw.to_str(), tmp_path / "hf", raw.token_to_id(EOT))
    back, tok, state = load_checkpoint(import_hf(folder, tmp_path / "out"))
    assert state["added_special_tokens"] == [IM_START, IM_END]
    assert (tok.im_start_id, tok.im_end_id) == (size, size + 1)
    assert all(tok.backend.token_to_id(t) == i for t, i in raw.get_vocab().items())  # no id moved
    assert back.config.vocab_size == 64 * -(-(size + 2) // 64)
    x = torch.randint(0, size, (1, 20))
    with torch.no_grad():
        assert torch.allclose(back(x)[0][..., :size], model(x)[0], atol=1e-6)
    assert tok.encode(f"{IM_START}user\nhi{IM_END}")[0] == size


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_import_folder_saved_by_transformers(arch, tok, tmp_path):
    """A folder written by transformers' own save_pretrained (not by our exporter) imports with equal logits."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 64 * -(-tok.vocab_size // 64)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=96, n_embd=64, n_layer=2, n_head=4, n_inner=200)
        hf = GPT2LMHeadModel(config)
    else:  # attention biases but no MLP biases: Jojo's single `bias` flag fills the MLP ones with zeros
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=96,
            rope_theta=500000.0,
            attention_bias=True,
            tie_word_embeddings=True,
        )
        hf = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
    hf.eval().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tok.to_json())
    model, _, _ = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "out"))
    assert model.config.block_size == 96 and model.config.bias
    x = torch.randint(0, tok.vocab_size, (2, 64))
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max().item() < 1e-4


def test_import_refuses_unsupported_architecture(hf_dirs, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    for f in hf_dirs["gpt2"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(JojoError, match="unsupported model type 'bert'"):
        import_hf(folder, tmp_path / "out")


# ---- safe loading ---------------------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"weight": torch.zeros(2), "payload": _Exploit(marker)}, path)
    assert not marker.exists()


def test_pytorch_model_bin_is_loaded_safely(hf_dirs, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    for f in hf_dirs["llama"].iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(str(hf_dirs["llama"] / "model.safetensors")), folder / "pytorch_model.bin")
    back, _, _ = load_checkpoint(import_hf(folder, tmp_path / "ok"))  # plain tensors: fine
    assert back.config.family == "llama"

    marker = tmp_path / "pwned"
    _plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(JojoError, match="refusing to load .*pytorch_model.bin"):
        import_hf(folder, tmp_path / "bad")
    assert not marker.exists()


def test_malicious_optimizer_state_is_refused(runs, tmp_path):
    ckpt = resolve_checkpoint(runs["gpt2"])
    planted = tmp_path / "ckpt"
    planted.mkdir()
    for f in ckpt.iterdir():
        (planted / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    _plant(planted / "optimizer.pt", marker)
    with pytest.raises(JojoError, match="refusing to load"):
        load_optimizer_state(planted)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what the refusal protects against: weights_only stops it
        torch.load(planted / "optimizer.pt", weights_only=True)


# ---- GGUF -------------------------------------------------------------------------------------------------------
def _rotate_half_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaved q/k row order (independent of the exporter's own permutation code)."""
    head = w.shape[0] // n_head
    idx = torch.cat(
        [torch.cat([h * head + torch.arange(0, head, 2), h * head + torch.arange(1, head, 2)]) for h in range(n_head)]
    )
    return w[idx]


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gguf_layout_and_metadata(name, qtype, runs, tok, tmp_path):
    gguf = pytest.importorskip("gguf")
    from jojo.export.gguf import export_gguf

    path = export_gguf(runs[name], tmp_path / "m.gguf", qtype)
    model, _, _ = load_checkpoint(runs[name])
    cfg = model.config
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == cfg.family
    assert field(f"{cfg.family}.context_length") == cfg.block_size
    assert field(f"{cfg.family}.block_count") == cfg.n_layer
    assert field(f"{cfg.family}.attention.head_count_kv") == cfg.n_kv_head
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    assert tokens[tok.im_start_id] == IM_START and types[tok.im_start_id] == gguf.TokenType.CONTROL
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[tok.encode(" cat")[0]] == gguf.TokenType.NORMAL
    merges = json.loads(tok.to_json())["model"]["merges"]
    assert len(field("tokenizer.ggml.merges")) == len(merges)
    assert field("tokenizer.ggml.eos_token_id") == tok.eot_id and field("tokenizer.ggml.eot_token_id") == tok.im_end_id
    assert field("tokenizer.chat_template") == CHAT_TEMPLATE_JINJA

    tensors = {t.name: t for t in reader.tensors}
    big = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}.get(
        qtype, gguf.GGMLQuantizationType.Q8_0
    )
    per_layer = ["attn_norm", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
    per_layer += ["attn_qkv"] if cfg.family == "gpt2" else ["attn_q", "attn_k", "attn_v", "ffn_gate"]
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.n_layer) for n in per_layer
    }
    if cfg.family == "gpt2":
        expected |= {"position_embd.weight", "output.weight", "output_norm.bias"}
        expected |= {f"blk.{i}.{n}.bias" for i in range(cfg.n_layer) for n in per_layer}
    assert set(tensors) == expected | ({"output.weight"} if not cfg.tie_embeddings else set())
    assert list(tensors["token_embd.weight"].shape) == [cfg.n_embd, cfg.vocab_size]  # GGUF order: ne0 = columns
    assert tensors["token_embd.weight"].tensor_type == big
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    if cfg.family == "gpt2":
        assert tensors["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensors["blk.1.attn_qkv.weight"].shape) == [cfg.n_embd, 3 * cfg.n_embd]
    else:
        kv = cfg.n_kv_head * cfg.head_dim
        assert list(tensors["blk.1.attn_k.weight"].shape) == [cfg.n_embd, kv]
        assert list(tensors["blk.1.ffn_gate.weight"].shape) == [cfg.n_embd, cfg.mlp_hidden]
        if qtype == "f32":  # q and k rows are in llama.cpp's interleaved RoPE order; v is untouched
            q, k, v = model.blocks[1].attn.qkv.weight.split([cfg.n_embd, kv, kv])
            stored = {n: torch.from_numpy(tensors[f"blk.1.attn_{n}.weight"].data.copy()) for n in "qkv"}
            assert torch.equal(_rotate_half_rows(stored["q"], cfg.n_head), q)
            assert torch.equal(_rotate_half_rows(stored["k"], cfg.n_kv_head), k)
            assert torch.equal(stored["v"], v)


def test_gguf_runs_in_llama_cpp(runs, tmp_path):
    """Optional: logits from llama.cpp itself (pip install llama-cpp-python) match Jojo's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from jojo.export.gguf import export_gguf

    text = render_chat([{"role": "user", "content": "Where is the cat?"}], add_generation_prompt=True) + "The cat"
    for name in VARIANTS:
        model, tok, _ = load_checkpoint(runs[name])
        path = export_gguf(runs[name], tmp_path / f"{name}.gguf", "f32")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0].numpy()
        assert np.abs(np.array(llm.scores[: len(ids)]) - ours).max() < 1e-3


# ---- Hub ---------------------------------------------------------------------------------------------------------
def test_upload_dry_run_writes_the_folder(runs, tmp_path, capsys):
    from jojo.cli import main

    out = tmp_path / "up"
    assert main(["upload", str(runs["gpt2"]), "--repo-name", "tiny-jojo", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing uploaded" in printed and str(out) in printed
    assert (out / "model.safetensors").is_file() and "YOUR_USERNAME/tiny-jojo" in (out / "README.md").read_text()
    args = ["upload", str(runs["llama"]), "--repo-name", "t", "--dry-run", "--out", str(tmp_path / "g")]
    assert main([*args, "--gguf", "q8_0"]) == 0
    assert (tmp_path / "g" / "t-q8_0.gguf").is_file()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
    return hub


def _upload_fails(runs, capsys, *extra) -> tuple[str, float]:
    from jojo.cli import main

    t0 = time.perf_counter()
    assert main(["upload", str(runs["gpt2"]), "--repo-name", "tiny-jojo", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jojo: error:") and err.count("\n") == 1  # one line, no traceback
    return err, time.perf_counter() - t0


def test_upload_without_token_fails_fast(no_token, runs, capsys):
    err, seconds = _upload_fails(runs, capsys)
    assert "no Hugging Face token" in err and seconds < 5


def test_upload_offline_fails_fast(no_token, runs, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err, seconds = _upload_fails(runs, capsys)
    assert "HF_HUB_OFFLINE" in err and seconds < 5


def test_upload_without_network_fails_fast(no_token, runs, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(no_token.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    err, seconds = _upload_fails(runs, capsys)
    assert "cannot reach the Hugging Face Hub" in err and seconds < 10


def test_upload_network_hang_hits_the_deadline(no_token, runs, capsys, monkeypatch):
    import jojo.export.hub as hub_mod

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(hub_mod, "NETWORK_TIMEOUT_S", 0.3)
    monkeypatch.setattr(no_token.HfApi, "whoami", lambda *a, **k: time.sleep(5))
    err, seconds = _upload_fails(runs, capsys)
    assert "no answer from the Hugging Face Hub" in err and seconds < 3


def test_upload_calls_the_hub(no_token, runs, monkeypatch, tmp_path, capsys):
    from jojo.cli import main

    calls = {}
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(no_token.HfApi, "whoami", lambda self, token=None: {"name": "alice"})

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        calls["create"] = (repo_id, private, exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))

    monkeypatch.setattr(no_token.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(no_token.HfApi, "upload_folder", upload_folder)
    args = ["upload", str(runs["gpt2"]), "--repo-name", "tiny-jojo", "--private", "--out", str(tmp_path / "u")]
    assert main(args) == 0
    assert calls["create"] == ("alice/tiny-jojo", True, True)
    assert calls["upload"][0] == "alice/tiny-jojo" and "model.safetensors" in calls["upload"][1]
    assert "alice/tiny-jojo" in (tmp_path / "u" / "README.md").read_text()
    assert main([*args[:-1], str(tmp_path / "v"), "--organization", "jojo-lab"]) == 0
    assert calls["create"][0] == "jojo-lab/tiny-jojo"
    assert "https://huggingface.co/jojo-lab/tiny-jojo" in capsys.readouterr().out


def test_gguf_refuses_tokenizers_llama_cpp_would_split_differently(runs, tmp_path):
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer as HFTokenizer

    from jojo.export.gguf import gguf_vocab
    from jojo.tokenizer import Tokenizer

    _, tok, _ = load_checkpoint(runs["gpt2"])
    data = json.loads(tok.to_json())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "_", "prepend_scheme": "always", "split": True}
    other = Tokenizer(HFTokenizer.from_str(json.dumps(data)))
    with pytest.raises(JojoError, match="GPT-2's pre-tokenization"):
        gguf_vocab(other, 512)


# ---- parts that no outside architecture loads --------------------------------------------------------------------
@pytest.mark.parametrize(
    "parts, message",
    [
        ({"positions": "rope", "norm": "rmsnorm"}, "match neither GPT-2"),
        ({"family": "llama", "mlp": "gelu"}, "match neither GPT-2"),
        ({"n_kv_head": 2}, "grouped-query attention"),
    ],
)
def test_export_refuses_parts_transformers_cannot_load(parts, message, tok, tmp_path, capsys):
    from jojo.cli import main

    cfg = dict(family="gpt2", vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=4, n_embd=32)
    write_checkpoint(tmp_path / "run", 1, GPT(ModelConfig(**{**cfg, **parts})), tok, {})
    with pytest.raises(JojoError, match=message):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert main(["export", "gguf", str(tmp_path / "run"), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.gguf").exists()
