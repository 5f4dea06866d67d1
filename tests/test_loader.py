"""BatchLoader: memory-mapped shards, rank split, per-epoch shuffles, exact resume, document-aligned rows."""

from __future__ import annotations

import numpy as np
import pytest

from jojo.data.loader import BatchLoader
from jojo.data.prepare import load_meta, prepare_source
from jojo.data.sources import RecordSource
from jojo.data.synthetic import iter_corpus_text
from jojo.errors import JojoError

T = 32


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    """A corpus cut into several small shards (so the shard order matters)."""
    out = tmp_path_factory.mktemp("sharded")
    docs = [{"text": t} for t in iter_corpus_text(1200, seed=21)]
    prepare_source(RecordSource(docs), tokenizer, out, val_fraction=0.1, shard_tokens=20_000, workers=1)
    return out


def _rows(batch) -> list[tuple]:
    return [tuple(r) for r in batch["input_ids"].tolist()]


def test_shards_are_memory_mapped(sharded):
    loader = BatchLoader(sharded, "train", batch_size=4, block_size=T)
    assert len(loader.data.shards) > 3
    assert all(isinstance(s, np.memmap) for s in loader.data.shards)
    batch = loader.next_batch()
    assert batch["input_ids"].shape == (4, T) and batch["targets"].shape == (4, T)
    assert batch["input_ids"][:, 1:].equal(batch["targets"][:, :-1])  # targets are inputs shifted by one


def test_each_epoch_visits_every_row_once_in_a_new_order(sharded):
    loader = BatchLoader(sharded, "train", batch_size=8, block_size=T, seed=3)
    epochs = []
    for _ in range(2):
        picks = []
        for _ in range(loader.steps_per_epoch):
            loader.next_batch()
            lo = loader.position - 8  # where this batch's rows were taken from
            picks += [tuple(p) for p in loader._order[lo : lo + 8].tolist()]
        epochs.append(picks)
    offsets = []
    for picks in epochs:
        assert len(picks) == len(set(picks)) == loader.steps_per_epoch * 8  # no row twice
        assert loader.rows_per_epoch - len(picks) < 8  # only the ragged tail is dropped
        # each row is a fixed window moved by its shard's offset of this epoch (0 <= offset < T), or left in place
        moved = {}
        for s, r in picks:
            base = loader.starts[s][np.searchsorted(loader.starts[s], r, side="right") - 1]
            assert 0 <= r - base < T and r + T < len(loader.data.shards[s])
            moved.setdefault(s, set()).add(int(r - base))
        assert all(len(d - {0}) <= 1 for d in moved.values())
        offsets.append(moved)
    assert offsets[0] != offsets[1] and any(d - {0} for d in offsets[0].values())  # new windows each epoch
    assert epochs[0] != epochs[1]
    # shard order is shuffled per epoch too, and rows of one shard stay together (locality)
    shard_runs = [[s for i, (s, _) in enumerate(p) if i == 0 or p[i - 1][0] != s] for p in epochs]
    assert all(len(run) == len(set(run)) for run in shard_runs)
    assert shard_runs[0] != shard_runs[1]
    assert shard_runs[0] != sorted(shard_runs[0]) or shard_runs[1] != sorted(shard_runs[1])


def test_ranks_read_disjoint_slices_of_the_same_global_batch(sharded):
    world = 3
    single = BatchLoader(sharded, "train", batch_size=4 * world, block_size=T, seed=5)
    ranks = [
        BatchLoader(sharded, "train", batch_size=4, block_size=T, seed=5, rank=r, world_size=world) for r in range(3)
    ]
    for _ in range(single.steps_per_epoch + 2):  # across an epoch boundary
        whole = _rows(single.next_batch())
        parts = [_rows(r.next_batch()) for r in ranks]
        assert sum(parts, []) == whole
        assert not set(parts[0]) & set(parts[1])
    assert all(r.epoch == single.epoch == 1 for r in ranks)


def test_resume_reads_exactly_what_an_uninterrupted_run_would(sharded):
    a = BatchLoader(sharded, "train", batch_size=4, block_size=T, seed=7)
    b = BatchLoader(sharded, "train", batch_size=4, block_size=T, seed=7)
    for _ in range(a.steps_per_epoch - 2):
        a.next_batch()
        b.next_batch()
    state = b.state_dict()
    resumed = BatchLoader(sharded, "train", batch_size=4, block_size=T, seed=7)
    resumed.load_state_dict(state)
    for _ in range(6):  # crosses into the next epoch
        assert _rows(a.next_batch()) == _rows(resumed.next_batch())
    for key, value in (("block_size", T * 2), ("seed", 8)):
        other = BatchLoader(sharded, "train", batch_size=4, block_size=value if key == "block_size" else T,
                            seed=value if key == "seed" else 7)  # fmt: skip
        with pytest.raises(JojoError, match=f"saved {key}"):
            other.load_state_dict(state)
    old_style = {"epoch": 1, "position": 8}  # checkpoints from before the extra keys still load
    resumed.load_state_dict(old_style)
    assert resumed.position == 8


def test_doc_aligned_rows(sharded, tokenizer):
    loader = BatchLoader(sharded, "train", batch_size=4, block_size=T, doc_aligned=True, shuffle=False)
    plain = BatchLoader(sharded, "train", batch_size=4, block_size=T)
    eot = tokenizer.eot_id
    for shard, rows in enumerate(loader.starts):
        tokens = np.asarray(loader.data.shards[shard])
        starts = set(np.flatnonzero(tokens == eot).tolist())
        bounds = sorted(starts) + [len(tokens)]
        length = {s: e - s for s, e in zip(bounds[:-1], bounds[1:])}
        prev = None
        for r in rows.tolist():
            if r not in starts:  # only the continuation of a document longer than a row
                doc = max(s for s in starts if s < r)
                assert length[doc] > T and prev is not None and r == prev + T
            prev = r
        # every document that fits in a row is seen whole in some row
        covered = set()
        for r in rows.tolist():
            covered.update(s for s in starts if r <= s and s + length[s] <= r + T + 1)
        fits = {s for s in starts if length[s] <= T and s + T < len(tokens) - T}
        assert fits <= covered
    # about one pass over the tokens per epoch, not block_size / doc_length passes
    assert plain.rows_per_epoch <= loader.rows_per_epoch < 1.6 * plain.rows_per_epoch
    batch = loader.next_batch()
    assert (batch["input_ids"][:, 0] == eot).any()


def test_empty_and_truncated_splits(sharded, tmp_path, tokenizer):
    meta = load_meta(sharded)
    assert meta["splits"]["test"]["docs"] == 0
    with pytest.raises(JojoError, match="fewer than one batch"):
        BatchLoader(sharded, "test", batch_size=1, block_size=T)
    with pytest.raises(JojoError, match="no 'holdout' split"):
        BatchLoader(sharded, "holdout", batch_size=1, block_size=T)
    out = tmp_path / "cut"
    prepare_source(RecordSource([{"text": t} for t in iter_corpus_text(200, seed=1)]), tokenizer, out, workers=1)
    shard = out / load_meta(out)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(JojoError, match="wrong size"):
        BatchLoader(out, "train", batch_size=1, block_size=T)


def test_sequential_iteration_covers_the_split(sharded):
    loader = BatchLoader(sharded, "val", batch_size=4, block_size=T, shuffle=False)
    rows = sum(b["input_ids"].shape[0] for b in loader.iter_sequential())
    assert rows == loader.rows_per_epoch
