"""Batches from prepared token shards.

Shards are memory-mapped: nothing is read until a row is used, so a corpus of any size costs no RAM.
A split is cut into rows of block_size + 1 tokens (inputs and their next-token targets). Each epoch visits
every row once: shards in a seeded random order, rows within a shard in a seeded random order. A training
step takes `batch_size * world_size` consecutive rows of that order and rank r keeps its own slice, so ranks
read disjoint data and N processes see exactly the rows one process with N times the batch would.

The position (epoch, rows consumed) is the loader's whole state: saving it with a checkpoint makes a resumed
run read exactly what an uninterrupted one would have.

With `doc_aligned`, every row starts at a document start (every document begins with <|endoftext|>), like
nanochat's BOS-aligned rows, without reading a token twice more than needed: a row holds the documents that
start in it; when the last of them does not fit, the next row starts again at that document's beginning (so
every document that fits in a row is seen whole, from its first token); a document longer than a row
continues in the following rows. Rows therefore overlap only by the tail of a cut document, never by more
than one document, and an epoch is about one pass over the tokens (the naive "a row at every document
start" reads short documents block_size / doc_length times per epoch).
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from jojo.data.prepare import load_meta
from jojo.errors import JojoError


class TokenSplit:
    """The memory-mapped shards of one split."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        if split not in self.meta["splits"]:
            raise JojoError(f"{self.data_dir} has no '{split}' split; re-run `jojo prepare`")
        self.split = split
        self.info = self.meta["splits"][split]
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [
            np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
            for s in self.info["shards"]
            if s["tokens"] > 0
        ]
        self.eot_id = self.meta["eot_id"]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def doc_starts(self, shard: int, chunk: int = 1 << 24) -> np.ndarray:
        """Positions of <|endoftext|> (document starts) in a shard, scanned in chunks to bound memory."""
        tokens = self.shards[shard]
        found = [
            np.flatnonzero(np.asarray(tokens[i : i + chunk]) == self.eot_id) + i for i in range(0, len(tokens), chunk)
        ]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def row_starts(self, shard: int, block_size: int, doc_aligned: bool) -> np.ndarray:
        """Start positions of the rows (block_size + 1 tokens each) of one shard."""
        n = len(self.shards[shard]) - 1  # the last token of a shard has no target
        if not doc_aligned:
            return np.arange(0, n - block_size + 1, block_size, dtype=np.int64)
        starts = self.doc_starts(shard).tolist()
        if not starts:
            return np.zeros(0, dtype=np.int64)
        T, length = block_size, n + 1
        rows, p = [], starts[0]
        while p + T <= n:
            rows.append(p)
            c = p + T
            i = bisect.bisect_left(starts, c)  # starts[i-1] < c <= starts[i]
            if i < len(starts) and starts[i] == c:
                p = c  # a document starts right where the row ends
                continue
            last = starts[i - 1]  # the last document starting at or before c
            end = starts[i] if i < len(starts) else length
            # re-start at the cut document when it began inside this row and fits in one row
            p = last if last > p and end - last <= T else c
        return np.asarray(rows, dtype=np.int64)


class BatchLoader:
    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        doc_aligned: bool = False,
        shuffle: bool = True,
        evaluation: bool = False,
    ):
        self.data = TokenSplit(data_dir, split)
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.doc_aligned, self.shuffle = doc_aligned, shuffle
        self.starts = [self.data.row_starts(i, block_size, doc_aligned) for i in range(len(self.data.shards))]
        self.rows_per_epoch = sum(len(s) for s in self.starts)
        self.rows_per_step = batch_size * world_size
        # an evaluation split is read whole by iter_sequential (the last batch may be short): one row is enough
        need = 1 if evaluation else self.rows_per_step
        if self.rows_per_epoch < need:
            raise JojoError(
                f"the '{split}' split of {data_dir} has {self.data.num_tokens} tokens: fewer than "
                f"{'one row' if evaluation else f'one batch of {self.rows_per_step} rows'} x {block_size + 1} tokens; "
                "use more data, a smaller --batch-size or a shorter model.block_size"
            )
        self.epoch = 0
        self.position = 0  # rows of this epoch already consumed (by all ranks together)
        self._order_epoch = -1

    # ---- order ---------------------------------------------------------------------------------------
    def _build_order(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        shard_order = rng.permutation(len(self.starts)) if self.shuffle else np.arange(len(self.starts))
        pieces = []
        for s in shard_order:
            rows = self.starts[s]
            if self.shuffle and not self.doc_aligned and len(rows):
                # Windows move by a random offset each epoch (one per shard), so a small corpus trained for many
                # epochs gives new rows instead of the same ones again; the count per epoch stays the same (a
                # row that would run past the shard's end keeps its place).
                last = len(self.data.shards[s]) - 1 - self.block_size
                moved = rows + int(rng.integers(0, self.block_size))
                rows = np.where(moved <= last, moved, rows)
            rows = rows[rng.permutation(len(rows))] if self.shuffle else rows
            pieces.append(np.stack([np.full(len(rows), s, dtype=np.int64), rows], axis=1))
        self._order = np.concatenate(pieces)
        self._order_epoch = self.epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.rows_per_epoch // self.rows_per_step

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position + self.rows_per_step > self.rows_per_epoch:
            self.epoch += 1
            self.position = 0  # the tail that does not fill a global batch is dropped
        if self._order_epoch != self.epoch:
            self._build_order()
        lo = self.position + self.rank * self.batch_size
        picks = self._order[lo : lo + self.batch_size]
        self.position += self.rows_per_step
        return self._rows(picks)

    def _rows(self, picks: np.ndarray) -> dict[str, torch.Tensor]:
        T = self.block_size
        buf = np.stack([np.asarray(self.data.shards[s][r : r + T + 1], dtype=np.int64) for s, r in picks])
        t = torch.from_numpy(buf)
        return {"input_ids": t[:, :-1], "targets": t[:, 1:]}

    def iter_sequential(self, max_batches: int = 0):
        """Every row of the split in file order (for evaluation), ignoring ranks and the epoch state."""
        pairs = [(s, r) for s, rows in enumerate(self.starts) for r in rows]
        count = 0
        for i in range(0, len(pairs), self.batch_size):
            if max_batches and count >= max_batches:
                return
            yield self._rows(np.array(pairs[i : i + self.batch_size], dtype=np.int64))
            count += 1

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rows_per_epoch": self.rows_per_epoch,
            "block_size": self.block_size,
            "doc_aligned": self.doc_aligned,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position. The row order depends on the seed, the rows on the data, block_size and
        doc_aligned: if any differs, the saved position would point into a different order, so refuse."""
        for key, mine in (
            ("seed", self.seed),
            ("block_size", self.block_size),
            ("doc_aligned", self.doc_aligned),
            ("rows_per_epoch", self.rows_per_epoch),
        ):
            if key in state and state[key] != mine:
                raise JojoError(
                    f"cannot resume the data position: saved {key}={state[key]}, now {mine} (the dataset or the "
                    "data settings changed); resume with the same dataset and settings, or start a new run"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
