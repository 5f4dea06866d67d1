"""The whole quickstart pipeline at a small scale: corpus -> tokenizer -> shards -> pretrain -> eval -> SFT."""

from __future__ import annotations

import json

from jojo.checkpoint import load_checkpoint
from jojo.quickstart import run_quickstart


def test_quickstart_small_scale_writes_the_report(tmp_path):
    out = tmp_path / "qs"
    report = run_quickstart(out=str(out), scale=0.05, device="cpu")
    saved = json.loads((out / "report.json").read_text())
    keys = ("params", "tokens_per_second", "val_bpb", "entropy_floor_bpb", "chat_exact_match", "wall_seconds")
    for key in (*keys, "chat_exact_match_base", "sft_steps", "sft_trained_fraction"):
        assert key in saved, key
    assert saved["val_bpb"] >= saved["entropy_floor_bpb"] > 0
    assert 0.0 <= saved["chat_exact_match"] <= 1.0 and 0.0 <= saved["chat_exact_match_base"] <= 1.0
    assert saved["sft_steps"] >= 1 and 0 < saved["sft_trained_fraction"] < 1
    assert report["params"] == saved["params"] > 0
    model, _, state = load_checkpoint(out / "sft")  # the chat model is a plain checkpoint with its SFT record
    assert state["sft"]["init_from"].endswith("model") and model.config.block_size == 256
    # the report and `jojo eval` are the same code: they cannot disagree
    from jojo.cli import main

    args = ["eval", str(out / "model"), "--tasks", "lm", "--data", str(out / "data"), "--split", "val",
            "--max-batches", "0", "--batch-size", "8", "--output", str(tmp_path / "eval.json")]  # fmt: skip
    assert main(args) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert round(evaluated["lm"]["bpb"], 4) == saved["val_bpb"], evaluated["lm"]
