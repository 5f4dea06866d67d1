"""Shared fixtures: a tokenizer and prepared shards made from Jojo's own corpus, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jojo.config import ModelConfig
from jojo.data.prepare import prepare_records
from jojo.data.synthetic import generate_corpus
from jojo.tokenizer import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def corpus():
    return generate_corpus(1500, seed=7)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer((d.text for d in corpus), 512)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    records = ({"text": d.text, "bits": d.bits} for d in corpus)
    prepare_records(records, tokenizer, out, val_fraction=0.1, seed=0, source="embedded")
    return out


def tiny_model_config(family: str, vocab_size: int = 512, **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=32)
    if family == "llama":
        base["n_kv_head"] = 2
    base.update(kw)
    return ModelConfig(**base)


def config_tree(prepared: Path, out: Path, *layers: dict, **sections: dict) -> dict:
    """A small training config tree over `prepared` shards, writing to `out`: the base below, then each of
    `layers` and finally `sections` (section name -> keys) merged over it, key by key."""
    tree = {
        "model": {"family": "gpt2", "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64},
        "data": {"dataset": str(prepared), "batch_size": 8},
        "optimizer": {"lr": 3e-3},
        "schedule": {"max_steps": 30, "warmup_steps": 5},
        # float32: where the exactness tests (resume bit-identity, 2 processes == 1) are defined, and the same on a
        # CPU with or without native bf16 (where `--dtype auto` would differ)
        "system": {"device": "cpu", "seed": 5, "dtype": "float32"},
        "logging": {"out_dir": str(out), "eval_interval": 10, "eval_iters": 4, "log_interval": 5, "progress": False},
    }
    for layer in (*layers, sections):
        for section, values in layer.items():
            tree.setdefault(section, {}).update(values)
    return tree


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
