"""The chat REPL: answers through stdin, /reset, /system, /save, context trimming, and `echo Hi | jojo chat`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model_config
from jojo.checkpoint import write_checkpoint
from jojo.infer.chat import ChatSession, run_repl
from jojo.infer.engine import SamplingConfig
from jojo.model import GPT
from jojo.train.sft import load_sft_data


class ScriptedModel(nn.Module):
    """Answers "I see N user turns." (N counted in its prompt), then <|im_end|>; records every prompt."""

    def __init__(self, tok, block_size: int = 64):
        super().__init__()
        self.tok = tok
        self.config = tiny_model_config("gpt2", vocab_size=tok.vocab_size, block_size=block_size)
        self.wte = nn.Embedding(1, 1)
        self.prompts: list[list[int]] = []
        self._user = tok.encode("user\n")

    def new_cache(self, batch_size, max_len=None, dtype=None):
        class Cache:
            pos = 0

        return Cache()

    def forward(self, idx, targets=None, *, cache=None, last_only=False, doc_ids=None):
        if cache.pos == 0:
            prompt = idx[0].tolist()
            self.prompts.append(prompt)
            n = sum(
                prompt[i] == self.tok.im_start_id and prompt[i + 1 : i + 1 + len(self._user)] == self._user
                for i in range(len(prompt))
            )
            self._script = self.tok.encode(f"I see {n} user turns.") + [self.tok.im_end_id]
            self._start = len(prompt)
        cache.pos += idx.shape[1]
        step = cache.pos - self._start
        logits = torch.full((1, 1, self.config.vocab_size), -1e9)
        logits[0, 0, self._script[min(step, len(self._script) - 1)]] = 0.0
        return logits, None


def session(tok, block_size=64, max_tokens=16, system=None):
    model = ScriptedModel(tok, block_size)
    return ChatSession(model, tok, SamplingConfig(max_tokens=max_tokens, temperature=0.0), system=system), model


def drive(sess, text: str) -> str:
    out: list[str] = []
    run_repl(sess, text.splitlines(keepends=True), out.append)
    return "".join(out)


def test_repl_answers_and_reset_clears_history(tokenizer):
    sess, model = session(tokenizer, block_size=256)
    out = drive(sess, "Hi\nHow are you?\n/reset\nHello again\n")
    assert out.splitlines() == [
        "I see 1 user turns.",
        "I see 2 user turns.",
        "(conversation cleared)",
        "I see 1 user turns.",
    ]
    assert [m["role"] for m in sess.messages] == ["user", "assistant"]
    assert sess.messages[1]["content"] == "I see 1 user turns."
    assert tokenizer.decode(model.prompts[-1]).endswith(
        "<|im_start|>user\nHello again<|im_end|>\n<|im_start|>assistant\n"
    )


def test_system_command_and_save(tokenizer, tmp_path):
    sess, model = session(tokenizer, block_size=256)
    path = tmp_path / "conv.json"
    out = drive(sess, f"/system Be brief.\nWhat is 2 plus 2?\n/save {path}\n/quit\nnot read\n")
    assert "(system prompt set)" in out and f"(saved to {path})" in out and out.count("I see") == 1
    assert tokenizer.decode(model.prompts[0]).startswith("<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n")
    saved = json.loads(path.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    data = load_sft_data(tokenizer, str(path), 256, val_fraction=0.0)  # /save writes what `jojo sft` reads
    assert len(data.train) == 1 and not data.skipped


def test_context_trimming_drops_oldest_turns_never_the_system_prompt(tokenizer):
    sess, model = session(tokenizer, block_size=64, max_tokens=16, system="You are Jojo.")
    lines = "".join(f"Question number {i} is here?\n" for i in range(8))
    out = drive(sess, lines)
    assert out.count("I see") == 8 and "dropped the oldest" in out
    for prompt in model.prompts:
        assert len(prompt) <= 64 - sess.reserve
        assert tokenizer.decode(prompt).startswith("<|endoftext|><|im_start|>system\nYou are Jojo.<|im_end|>\n")
    last = tokenizer.decode(model.prompts[-1])
    assert "Question number 7" in last and "Question number 0" not in last
    assert sess.messages[0]["role"] == "system" and sess.messages[1]["role"] == "user"


def test_too_long_message_is_reported_not_fatal(tokenizer):
    sess, _ = session(tokenizer, block_size=64)
    out = drive(sess, "word " * 100 + "\nHi\n")
    assert "the message is too long" in out and out.strip().endswith("I see 1 user turns.")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("chat-ckpt")
    write_checkpoint(run, 0, GPT(tiny_model_config("gpt2", block_size=128)), tokenizer, {})
    return run


def test_piped_stdin_prints_exactly_the_answer(ckpt, tokenizer):
    proc = subprocess.run(
        [sys.executable, "-m", "jojo.cli", "chat", str(ckpt), "--temperature", "0", "--max-tokens", "12"],
        input="Hi\n",
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    from jojo.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(ckpt)
    sess = ChatSession(model, tok, SamplingConfig(max_tokens=12, temperature=0.0))
    assert proc.stdout == "".join(sess.reply("Hi")) + "\n"
