"""Which cells each rank reads, in which order: one global order per epoch, sliced among the ranks, resumable.

Per epoch a seeded permutation of fixed-size blocks of consecutive store rows (contiguous reads, few chunks) is laid
end to end; it is walked in windows of `buffer_batches` global batches whose cells are shuffled inside the window,
which makes batches near-i.i.d. while the reader still decodes whole blocks. The sequence of global batches is a
function of (split, seed, epoch, global batch) alone, never of the number of ranks or of gradient accumulation
(prior art: MosaicML streaming's canonical nodes): global step s is the cells at positions [s·G, (s+1)·G) of the
epoch's order, G = batch_size × accumulation × world_size; its micro-batch i on rank r is the batch_size cells from
s·G + (i·world_size + r)·batch_size. So 2 ranks × B, 1 rank × 2B and 1 rank × B with accumulation 2 see the same
cells in every step, and a position saved as cells into the epoch resumes on any number of ranks with the same G.

Only the windows being read are ever expanded (memory O(window + blocks), whatever the split's size). Pure numpy;
never imports engine or kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class BlockShuffleSampler:
    """Rows [start, stop) of a store (a split), batched for `rank` of `world_size`: `batch_size` cells per rank and
    micro-batch, `accumulation` micro-batches per optimiser step. `block_size` consecutive rows are read together
    (1,024: ~7 compressed chunks, bench/randomness.py measures how i.i.d. the batches stay); a shuffle window spans
    `buffer_batches` global batches. `drop_last=False` (evaluation) keeps a last, shorter global batch, cut among
    the ranks as evenly as it goes."""

    start: int
    stop: int
    batch_size: int = 8192
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True
    accumulation: int = 1
    block_size: int = 1024
    buffer_batches: int = 2

    kind = "block_shuffle"

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise InputError("RANK/WORLD_SIZE", f"rank {self.rank} outside [0, world_size={self.world_size})",
                             "launch with the deepspeed launcher, or set RANK below WORLD_SIZE")
        for name in ("batch_size", "block_size", "buffer_batches", "accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stop < self.start:
            raise ValueError(f"empty or inverted cell range [{self.start}, {self.stop})")
        if self.drop_last and self.n_cells and self.steps() == 0:
            most = self.n_cells // (self.world_size * self.accumulation)
            fix = (f"use --batch-size {most} or less (or fewer ranks, or less accumulation)" if most else
                   f"use fewer ranks and less accumulation: their product may be at most {self.n_cells:,}, one cell "
                   "a rank and micro-batch")
            raise InputError("--batch-size", f"{self.batch_size} × {self.world_size} rank(s) × {self.accumulation} "
                             f"accumulated = {self.global_batch:,} cells a step exceeds the {self.n_cells:,} cells of "
                             "this split", fix)

    @property
    def n_cells(self) -> int:
        return self.stop - self.start

    @property
    def global_batch(self) -> int:
        """Cells per optimiser step, over all ranks and micro-batches."""
        return self.batch_size * self.accumulation * self.world_size

    @property
    def micro_cells(self) -> int:
        """Cells per micro-batch over all ranks: the unit a rank's step counter moves through the epoch."""
        return self.batch_size * self.world_size

    def identity(self) -> dict:
        """What a saved position must share with this sampler to replay the same global batches (not the ranks)."""
        return {"sampler": self.kind, "seed": self.seed, "global_batch": self.global_batch,
                "block_size": self.block_size, "buffer_batches": self.buffer_batches, "n_cells": self.n_cells}

    def steps(self) -> int:
        """Micro-batches per epoch, the same on every rank: whole global batches (training), or enough for every
        cell (evaluation; the last one shorter, and empty on a rank that the last cells do not reach)."""
        if self.drop_last:
            return self.n_cells // self.global_batch * self.accumulation
        return -(-self.n_cells // self.micro_cells)

    def __len__(self) -> int:
        return self.steps()

    def cells_before(self, step: int) -> int:
        """Positions of the epoch's order consumed (by all ranks) before micro-batch `step`."""
        return min(step * self.micro_cells, self.n_cells)

    # --- the global order --------------------------------------------------------------------------------------
    def _blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(first row, end position) of each block in the epoch's block order."""
        n_blocks = -(-self.n_cells // self.block_size)
        blocks = np.random.default_rng([self.seed, epoch, 0]).permutation(n_blocks)
        lengths = np.minimum(self.block_size, self.n_cells - blocks * self.block_size)
        return self.start + blocks * self.block_size, np.cumsum(lengths)

    def _positions(self, blocks, a: int, b: int) -> np.ndarray:
        """Store rows at positions [a, b) of the block order (before the window shuffle)."""
        firsts, ends = blocks
        if b <= a:
            return np.zeros(0, np.int64)
        lo, hi = np.searchsorted(ends, a, side="right"), np.searchsorted(ends, b - 1, side="right")
        starts = ends[lo:hi + 1] - np.diff(np.concatenate(([0], ends)))[lo:hi + 1]
        lens = ends[lo:hi + 1] - starts
        rows = np.repeat(firsts[lo:hi + 1] - starts, lens) + np.arange(starts[0], ends[hi])
        return rows[a - starts[0]:b - starts[0]].astype(np.int64)

    def window(self, epoch: int, w: int, blocks=None) -> np.ndarray:
        """The store rows at window w of the epoch's global order, shuffled inside the window."""
        size = self.buffer_batches * self.global_batch
        rows = self._positions(blocks or self._blocks(epoch), w * size, min((w + 1) * size, self.n_cells))
        np.random.default_rng([self.seed, epoch, 1, w]).shuffle(rows)
        return rows

    def order(self, epoch: int) -> np.ndarray:
        """The whole epoch's global order (every rank's cells; for tests and small splits)."""
        size = self.buffer_batches * self.global_batch
        blocks = self._blocks(epoch)
        return np.concatenate([self.window(epoch, w, blocks) for w in range(-(-self.n_cells // size))] or
                              [np.zeros(0, np.int64)])

    def _slice(self, step: int) -> tuple[int, int]:
        """Positions [a, b) of the epoch's order that micro-batch `step` gives this rank."""
        first = step * self.micro_cells
        n = min(self.micro_cells, self.n_cells - first)
        r, w = self.rank, self.world_size
        if n == self.micro_cells:
            return first + r * self.batch_size, first + (r + 1) * self.batch_size
        return first + r * n // w, first + (r + 1) * n // w

    def windows(self, epoch: int, start_step: int = 0):
        """[(step, rows), …] of this rank, grouped by shuffle window (the unit the reader decodes at once). A rank
        that the last, shorter batch of an evaluation does not reach gets an empty batch there, never none: every
        rank takes the same steps."""
        size = self.buffer_batches * self.global_batch
        blocks, current, rows, group = self._blocks(epoch), None, None, []
        for step in range(start_step, self.steps()):
            a, b = self._slice(step)
            w = a // size if b > a else (step * self.micro_cells) // size
            if w != current:
                if group:
                    yield group
                current, rows, group = w, self.window(epoch, w, blocks), []
            group.append((step, rows[a - w * size:b - w * size]))
        if group:
            yield group

    def batches(self, epoch: int, start_step: int = 0):
        """(step, rows) for the remaining micro-batches of `epoch` on this rank."""
        for group in self.windows(epoch, start_step):
            yield from group
