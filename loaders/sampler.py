"""Which cells each rank reads, in which order: block-shuffled, rank-sharded, resumable.

Per epoch a seeded permutation of fixed-size blocks of consecutive store rows (contiguous reads, few chunks)
is laid end to end and cut into `world_size` contiguous shares whose sizes differ by at most one cell, so
ranks are disjoint and get the same number of steps. Each share is walked in windows of `buffer_batches`
batches whose cells are shuffled inside the window, which makes batches near-i.i.d. while the reader
still decodes whole blocks. Everything is a pure function of (seed, epoch, rank), so resuming at a step
replays exactly the remaining batches. Pure numpy; never imports engine or kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class _SplitSampler:
    """What every sampler shares: rows [start, stop) of a split, cut into `world_size` contiguous shares whose
    sizes differ by at most one cell, batched for `rank`; subclasses define `order` (and `windows`)."""

    start: int
    stop: int
    batch_size: int = 8192
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True

    kind = "abstract"
    RESUME_FIELDS = ("seed", "rank", "world_size", "batch_size")

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise InputError("RANK/WORLD_SIZE", f"rank {self.rank} outside [0, world_size={self.world_size})",
                             "launch with the deepspeed launcher, or set RANK below WORLD_SIZE")
        for name in ("batch_size", "block_size", "buffer_batches"):
            if getattr(self, name, 1) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stop < self.start:
            raise ValueError(f"empty or inverted cell range [{self.start}, {self.stop})")
        if self.drop_last and self.n_cells and self.steps() == 0:
            share = self.n_cells // self.world_size
            raise InputError("--batch-size", f"{self.batch_size} exceeds the {share:,} cells each of "
                             f"{self.world_size} rank(s) gets from this split", f"use --batch-size {share} or less "
                             "(or fewer ranks)")

    @property
    def n_cells(self) -> int:
        return self.stop - self.start

    def identity(self) -> dict:
        """What a saved position must share with this sampler to replay the same batches."""
        return {"sampler": self.kind, **{k: getattr(self, k) for k in self.RESUME_FIELDS}, "n_cells": self.n_cells}

    def share_bounds(self, rank: int) -> tuple[int, int]:
        """Positions [a, b) of `rank`'s share among the split's n_cells (in the epoch's order)."""
        n, w = self.n_cells, self.world_size
        return rank * n // w, (rank + 1) * n // w

    def steps(self) -> int:
        """Batches per epoch, the same on every rank: full batches of the smallest share (training), or enough
        batches for the largest share (evaluation; a smaller share's last batch is shorter)."""
        sizes = [b - a for a, b in (self.share_bounds(r) for r in range(self.world_size))]
        return min(sizes) // self.batch_size if self.drop_last else -(-max(sizes) // self.batch_size)

    def __len__(self) -> int:
        return self.steps()

    def order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def batches(self, epoch: int, start_step: int = 0):
        """(step, rows) for the remaining steps of `epoch`. A share that runs out early (evaluation:
        drop_last=False, shares differ by a cell) ends there: no empty batches."""
        rows = self.order(epoch)
        for step in range(start_step, self.steps()):
            batch = rows[step * self.batch_size:(step + 1) * self.batch_size]
            if len(batch) == 0:
                return
            yield step, batch


@dataclass(frozen=True)
class BlockShuffleSampler(_SplitSampler):
    """Rows [start, stop) of a store (a split), batched for one rank. `block_size` consecutive rows are read
    together (1,024: ~7 compressed chunks, bench/randomness.py measures how i.i.d. the batches stay); a shuffle
    window spans `buffer_batches` batches."""

    block_size: int = 1024
    buffer_batches: int = 2

    kind = "block_shuffle"
    RESUME_FIELDS = ("seed", "rank", "world_size", "batch_size", "block_size", "buffer_batches")

    def order(self, epoch: int) -> np.ndarray:
        """This rank's store rows for `epoch`, in the order they are batched (int64)."""
        n_blocks = -(-self.n_cells // self.block_size)
        blocks = np.random.default_rng([self.seed, epoch, 0]).permutation(n_blocks)
        lengths = np.minimum(self.block_size, self.n_cells - blocks * self.block_size)
        ends = np.cumsum(lengths)
        a, b = self.share_bounds(self.rank)
        first, last = np.searchsorted(ends, a, side="right"), np.searchsorted(ends, b, side="left")
        if b == a:
            return np.zeros(0, np.int64)
        starts, lens = self.start + blocks[first:last + 1] * self.block_size, lengths[first:last + 1]
        rows = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
        offset = a - (ends[first] - lengths[first])
        rows = rows[offset:offset + (b - a)]
        window = self.buffer_batches * self.batch_size
        for w, s in enumerate(range(0, len(rows), window)):
            np.random.default_rng([self.seed, epoch, 1, self.rank, w]).shuffle(rows[s:s + window])
        return rows.astype(np.int64, copy=False)

    def windows(self, epoch: int, start_step: int = 0):
        """[(step, rows), …] grouped by shuffle window: the unit the reader decodes at once."""
        group, current = [], None
        for step, rows in self.batches(epoch, start_step):
            w = step // self.buffer_batches
            if current is not None and w != current:
                yield group
                group = []
            current = w
            group.append((step, rows))
        if group:
            yield group


@dataclass(frozen=True)
class ShardSampler(_SplitSampler):
    """Rows [start, stop) of a split for a resident rank: the rank's share is a fixed contiguous part of the split
    (the converter already shuffled the cells, and each rank reads only its own), and every epoch visits it in a
    uniform random permutation, a pure function of (seed, epoch, rank). Unlike BlockShuffleSampler, whose blocks
    keep disk reads contiguous and whose shares change every epoch, a rank here always sees the same cells, in a
    fully random order; a resume refuses to switch between the two."""

    kind = "uniform_shard"

    def share(self, rank: int | None = None) -> tuple[int, int]:
        """Store rows [a, b) of `rank`'s (this rank's) share."""
        a, b = self.share_bounds(self.rank if rank is None else rank)
        return self.start + a, self.start + b

    def order(self, epoch: int) -> np.ndarray:
        """This rank's store rows for `epoch`, in the order they are batched (int64)."""
        a, b = self.share()
        return a + np.random.default_rng([self.seed, epoch, 2, self.rank]).permutation(b - a).astype(np.int64)

    def windows(self, epoch: int, start_step: int = 0):
        """One window: the whole share is in memory already."""
        group = list(self.batches(epoch, start_step))
        if group:
            yield group
