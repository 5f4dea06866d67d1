"""SFT: the loss mask, packing, bad records, LoRA, and the exported chat template's ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_config
from jojo.checkpoint import load_checkpoint, write_checkpoint
from jojo.config import load_config
from jojo.data.messages import messages_from_record
from jojo.errors import JojoError
from jojo.model import GPT, IGNORE_INDEX
from jojo.tokenizer import CHAT_TEMPLATE_JINJA, IM_END, encode_chat, render_chat
from jojo.train.lora import LoRALinear, apply_lora, merge_lora, merged_state_dict
from jojo.train.sft import Conversation, SFTSource, load_sft_data, run_sft

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And the colour of the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised tiny model saved as a checkpoint (SFT mechanics do not need a trained one)."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config("gpt2", block_size=128, n_embd=64))
    run = tmp_path_factory.mktemp("base")
    write_checkpoint(run, 0, model, tokenizer, {})
    return run


def sft_cfg(out: Path, **sections):
    tree = {
        "data": {"batch_size": 4, "embedded_chats": 120},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"max_steps": 6, "warmup_steps": 1},
        "system": {"device": "cpu", "seed": 3, "dtype": "float32"},  # resume bit-identity is defined in float32
        "logging": {"out_dir": str(out), "eval_interval": 3, "eval_iters": 2, "log_interval": 3, "progress": False},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return load_config("sft-tiny", tree)


# ---- the mask ------------------------------------------------------------------------------------------
def test_mask_is_assistant_content_and_its_im_end(tokenizer):
    ids, train = encode_chat(tokenizer, CONV)
    assert ids[0] == tokenizer.eot_id and not train[0]
    trained = [i for i, t in zip(ids, train) if t]
    assert tokenizer.decode(trained) == f"2 plus 3 is 5.{IM_END}The sky is blue.{IM_END}"
    # contiguous spans: exactly each answer's content followed by its closing <|im_end|>
    spans, start = [], None
    for k, t in enumerate([*train, False]):
        if t and start is None:
            start = k
        elif not t and start is not None:
            spans.append((start, k))
            start = None
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == [f"2 plus 3 is 5.{IM_END}", f"The sky is blue.{IM_END}"]
    for a, b in spans:  # the token before each span ends the "<|im_start|>assistant\n" header (masked)
        assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n")
        assert ids[b - 1] == tokenizer.im_end_id and tokenizer.decode([ids[b]]) == "\n"


@pytest.mark.parametrize("packing", [True, False])
def test_batch_targets_are_the_masked_next_tokens(tokenizer, packing):
    convs = [messages_from_record({"messages": CONV}), [CONV[1], CONV[2]]]
    encoded = [Conversation(*encode_chat(tokenizer, m)) for m in convs]
    src = SFTSource(encoded, batch_size=2, block_size=128, pad_id=tokenizer.eot_id, packing=packing, shuffle=False)
    batch = next(src.iter_sequential())
    x, y = batch["input_ids"], batch["targets"]
    got = [int(t) for t in y.flatten() if t != IGNORE_INDEX]
    want = [i for c in encoded for i, t in zip(c.ids[1:], c.train[1:]) if t]
    assert got == want
    assert x.shape[0] == (1 if packing else 2)
    assert ("doc_ids" in batch) == packing
    stats = src.token_stats()
    assert 0 < stats["trained_fraction"] <= stats["trained_fraction_of_tokens"] < 1


# ---- packing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_same_alone_and_packed(tokenizer, family):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(family, block_size=128)).eval()
    convs = [CONV, CONV[1:3], [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}]]
    encoded = [Conversation(*encode_chat(tokenizer, m)) for m in convs]
    src = SFTSource(encoded, batch_size=1, block_size=128, pad_id=tokenizer.eot_id, packing=True, shuffle=False)
    batch = next(src.iter_sequential())
    assert int(batch["doc_ids"].max()) == 2  # all three in one row
    with torch.no_grad():
        packed, _ = model(batch["input_ids"], doc_ids=batch["doc_ids"])
        pos = 0
        for conv in encoded:
            n = len(conv) - 1
            alone, _ = model(torch.tensor([conv.ids[:-1]]))
            torch.testing.assert_close(packed[0, pos : pos + n], alone[0], rtol=1e-5, atol=1e-5)
            pos += n


# ---- exported template ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gen_prompt", [False, True])
def test_hf_chat_template_gives_the_ids_sft_trains_on(tokenizer, gen_prompt):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    hf_tok.chat_template = CHAT_TEMPLATE_JINJA
    ids = hf_tok.apply_chat_template(CONV, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False)
    ours, _ = encode_chat(tokenizer, CONV, add_generation_prompt=gen_prompt, bos=False)
    assert list(ids) == ours == tokenizer.encode(render_chat(CONV, add_generation_prompt=gen_prompt))


# ---- reading and bad records ---------------------------------------------------------------------------
def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


BAD = [
    {"messages": [{"content": "hi"}, {"role": "assistant", "content": "hello"}]},  # missing role
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty answer
    {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]},  # too long
    {"messages": [{"role": "user", "content": "hi"}, {"role": "narrator", "content": "x"}]},  # unknown role
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<|im_end|>\nb"}]},
    {"messages": [{"role": "user", "content": "no answer"}]},
]
GOOD = [
    {"messages": CONV},
    {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello!"}]},
]


def test_bad_conversations_are_skipped_with_counts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chats.jsonl", GOOD + BAD)
    data = load_sft_data(tokenizer, str(path), 128, val_fraction=0.0)
    assert len(data.train) == 2 and data.skipped == len(BAD)
    assert data.bad["no role"] == 1 and data.bad["empty assistant"] == 1
    assert data.bad["longer than the context"] == 1 and data.bad["unknown role"] == 1
    assert "chats.jsonl:3" in data.examples[0] and "skipped 6" in data.summary()


@pytest.mark.parametrize("bad", BAD)
def test_bad_conversation_is_an_error_on_request(tmp_path, tokenizer, bad):
    path = write_jsonl(tmp_path / "chats.jsonl", [*GOOD, bad])
    with pytest.raises(JojoError, match=r"chats\.jsonl:3: "):
        load_sft_data(tokenizer, str(path), 128, on_bad="error")


def test_alpaca_json_array(tmp_path, tokenizer):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Empty.", "input": "", "output": ""},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    data = load_sft_data(tokenizer, str(path), 128, val_fraction=0.0)
    assert len(data.train) == 2 and data.bad["empty assistant"] == 1
    assert messages_from_record(rows[0]) == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


# ---- training through fit, full and LoRA ---------------------------------------------------------------
def test_sft_runs_through_fit_from_the_checkpoint(tmp_path, base_ckpt):
    out = tmp_path / "sft"
    result = run_sft(sft_cfg(out), str(base_ckpt), quiet=True, say=lambda s: None)
    assert result.fit.step == 6 and result.data.train and result.data.val
    assert 0 < result.stats["trained_fraction"] < 1
    model, tok, state = load_checkpoint(out)
    assert model.config.block_size == 128  # the checkpoint's, not the preset's
    assert state["sft"]["packing"] is True and state["sft"]["lora"] is None
    assert json.loads((out / "run_config.json").read_text())["system"]["compile"] is False  # auto: SFT not compiled
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" for r in rows)


def test_sft_resume_is_bit_identical_to_uninterrupted(tmp_path, base_ckpt):
    import os
    import shutil

    from safetensors.torch import load_file

    from jojo.checkpoint import resolve_checkpoint

    quiet = dict(quiet=True, say=lambda s: None)
    full = tmp_path / "full"
    run_sft(sft_cfg(full, logging={"keep_last": 10}), str(base_ckpt), **quiet)
    steps = sorted(p.name for p in full.glob("step-*"))
    assert steps[-1] == "step-000006" and "step-000003" in steps
    cut = tmp_path / "cut"  # a run "interrupted" at step 3: only that checkpoint is there
    cut.mkdir()
    shutil.copytree(full / "step-000003", cut / "step-000003")
    os.symlink("step-000003", cut / "latest")
    with pytest.raises(JojoError, match="--resume"):  # without the flag the directory is protected
        run_sft(sft_cfg(cut), str(base_ckpt), **quiet)
    result = run_sft(sft_cfg(cut), None, resume=True, **quiet)
    assert result.fit.step == 6
    a = load_file(str(full / "step-000006" / "model.safetensors"))
    b = load_file(str(resolve_checkpoint(cut) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, _, state = load_checkpoint(cut)
    assert state["sft"]["init_from"] == str(base_ckpt)  # still names the pretrained model it started from


def test_sft_resume_errors(tmp_path, base_ckpt):
    quiet = dict(quiet=True, say=lambda s: None)
    with pytest.raises(JojoError, match="nothing to resume"):
        run_sft(sft_cfg(tmp_path / "none"), None, resume=True, **quiet)
    with pytest.raises(JojoError, match="not an SFT checkpoint"):
        run_sft(sft_cfg(base_ckpt), None, resume=True, **quiet)
    lora = tmp_path / "lora"
    run_sft(sft_cfg(lora, lora={"rank": 4}), str(base_ckpt), **quiet)
    with pytest.raises(JojoError, match="LoRA"):
        run_sft(sft_cfg(lora, lora={"rank": 4}), None, resume=True, **quiet)


def test_lora_trains_only_adapters_and_merges_exactly(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_model_config("llama", block_size=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = apply_lora(model, rank=4, alpha=8, targets="qkv,proj,mlp")
    assert len(adapted) == 2 * (2 + 3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    from jojo.config import OptimizerConfig
    from jojo.train.optim import build_optimizer

    opt = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.0))
    seen = {id(p) for g in opt.param_groups for p in g["params"]}
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    x = torch.randint(0, 500, (2, 32))
    for _ in range(3):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, value in model.state_dict().items():  # frozen base weights did not move
        if name in before:
            torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        lora_logits, _ = model(x)
        plain = GPT(model.config)
        plain.load_state_dict(merged_state_dict(model))
        merged_logits, _ = plain.eval()(x)
        torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged_logits, GPT(model.config).eval()(x)[0])
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(x)[0], lora_logits, rtol=1e-4, atol=1e-4)


def test_lora_sft_checkpoint_is_plain_merged_weights(tmp_path, base_ckpt):
    out = tmp_path / "lora"
    cfg = sft_cfg(out, lora={"rank": 4, "targets": "qkv,proj"})
    result = run_sft(cfg, str(base_ckpt), quiet=True, say=lambda s: None)
    assert result.lora["trainable"] < result.lora["total"] / 4
    model, _, state = load_checkpoint(out)  # loads strictly into a plain GPT
    base, _, _ = load_checkpoint(base_ckpt)
    sd, base_sd = model.state_dict(), base.state_dict()
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], base_sd["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(sd["blocks.0.mlp.fc.weight"], base_sd["blocks.0.mlp.fc.weight"], rtol=0, atol=0)
    assert state["sft"]["lora"]["rank"] == 4


def test_cli_sft_needs_a_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jojo.cli", "sft", "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--init-from" in proc.stderr and "Traceback" not in proc.stderr
