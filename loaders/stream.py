"""BatchStream: dense (or CSR) batches of cells from a cell store, straight into a training loop.

The sampler (`BlockShuffleSampler`) decides which rows; this file turns them into batches. A reader thread
decodes one shuffle window at a time (each needed chunk once, on a small thread pool) and normalises counts
(unless `normalize=False`: then the values stay as stored, e.g. for a GPU that normalises while densifying);
a second thread scatters each batch into a ring of reused dense buffers (one pinned block when CUDA is available),
or, with output="csr", gathers its rows into a ring of reused CSR blocks (one pinned block per slot, grown only
when a batch holds more values than the slot ever did). A yielded batch's buffers stay valid until two more
batches have been requested (one without CUDA), so an async host-to-device copy of it can finish. An exception
in a worker reaches the consumer as itself.
Never imports engine or kernels.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .chunks import ShardedArray
from .densify import gather_rows, log1p_per_10k, scatter_rows
from .errors import InputError
from .sampler import BlockShuffleSampler
from .store import CellStore, open_store


def _held() -> int:
    """Yielded batches whose buffers stay untouched: two when an async host→device copy may still read one."""
    return 2 if torch.cuda.is_available() else 1


@dataclass
class Batch:
    """One batch: `x` dense float32 [n, genes] (output="dense") or the CSR triplet (output="csr": `indptr` int64,
    `indices` the store's index dtype (uint16 up to 65,535 genes), `data` float32), `obs` int64 codes by column,
    `index` the store rows. `epoch`/`step` say where it sits in the stream."""

    index: torch.Tensor
    obs: dict[str, torch.Tensor]
    epoch: int
    step: int
    x: torch.Tensor | None = None
    indptr: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    data: torch.Tensor | None = None
    slot: int = field(default=-1, repr=False)

    def __len__(self) -> int:
        return len(self.index)


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t  # CPU-only builds cannot pin


class _Stop(Exception):
    pass


class BatchStream:
    def __init__(self, store: str | Path | CellStore, split: str = "train", batch_size: int = 8192, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, block_size: int = 1024,
                 buffer_batches: int = 2, threads: int = 2, output: str = "dense", columns=None,
                 drop_last: bool | None = None, normalize: bool = True, prefetch: int = 2):
        self.store = open_store(store)
        if output not in ("dense", "csr"):
            raise ValueError(f"output must be 'dense' or 'csr', not {output!r}")
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        start, stop = self.store.split(split)
        self.split, self.output, self.threads, self.prefetch = split, output, max(1, threads), max(1, prefetch)
        self.normalize = normalize and self.store.value_kind == "counts"
        self.sampler = BlockShuffleSampler(start, stop, batch_size, block_size, buffer_batches, seed, rank, world_size,
                                           split == "train" if drop_last is None else drop_last)
        available = self.store.obs_columns
        if columns is None:  # the label most training needs, where the store has it
            columns = [c for c in ("cell_type",) if c in available]
        missing = [c for c in columns if c not in available]
        if missing:
            raise InputError(self.store.path / "obs.parquet", f"no obs column(s) {missing}",
                             f"choose from {sorted(available)}")
        self.obs = {c: self.store.obs_codes(c).astype(np.int64) for c in columns}
        self.epoch, self.step = 0, 0
        self._buffers: torch.Tensor | list | None = None

    # --- the contract ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sampler.steps()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (a complete pass also rewinds to it)."""
        self.epoch, self.step = int(epoch), 0

    def endless(self):
        """Batches epoch after epoch from the current position (each batch says its epoch): a training loop is a
        plain `for` over this, and `state_dict()` stays exact at every batch."""
        while True:
            yield from self
            self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        s = self.sampler
        return {"epoch": self.epoch, "step": self.step, "seed": s.seed, "rank": s.rank, "world_size": s.world_size,
                "batch_size": s.batch_size, "block_size": s.block_size, "buffer_batches": s.buffer_batches,
                "split": self.split, "n_cells": s.n_cells, "store": self.store.checksum}

    def state_after(self, batch: Batch) -> dict:
        """state_dict() as it stands once `batch` is consumed: what a checkpoint holds when the consumer reads
        ahead of the step it trains (the CUDA feed copies the next batch while this one trains)."""
        return {**self.state_dict(), "epoch": batch.epoch, "step": batch.step + 1}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("store", "seed", "rank", "world_size", "batch_size", "block_size", "buffer_batches", "split",
                    "n_cells"):
            if state.get(key) != mine[key]:
                raise InputError(self.store.path, f"cannot resume the loader: the saved position has {key}="
                                 f"{state.get(key)!r}, this stream {mine[key]!r}; the remaining batches would differ",
                                 "resume with the same store, ranks and batch size")
        epoch, step = state.get("epoch"), state.get("step")
        if not (isinstance(epoch, int) and isinstance(step, int) and epoch >= 0 and 0 <= step <= len(self)):
            raise InputError(self.store.path, f"cannot resume the loader: position epoch={epoch!r}, step={step!r} is "
                             f"outside [0, {len(self)}] steps of an epoch", "resume from an intact checkpoint")
        self.epoch, self.step = epoch, step

    # --- the pipeline ----------------------------------------------------------------------------------
    def __iter__(self):
        epoch, start = self.epoch, self.step
        stop = threading.Event()
        windows: queue.Queue = queue.Queue(maxsize=1)
        turn = threading.Semaphore(1)  # the reader starts a window only once the previous one is taken: 2 alive
        batches: queue.Queue = queue.Queue(maxsize=self.prefetch)
        free: queue.Queue = queue.Queue()
        for slot in range(self._ring_slots()):
            free.put(slot)
        workers = [threading.Thread(target=self._guard, args=(self._read_windows, stop, windows, epoch, start,
                                                              windows, turn), daemon=True),
                   threading.Thread(target=self._guard, args=(self._densify, stop, batches, windows, batches, free,
                                                              epoch, turn), daemon=True)]
        for w in workers:
            w.start()
        held: deque = deque()
        try:
            while True:
                item = batches.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item.slot >= 0:
                    held.append(item.slot)
                    if len(held) > _held():
                        free.put(held.popleft())
                self.step = item.step + 1
                yield item
            if self.step >= len(self):
                self.step = 0
        finally:
            stop.set()
            for q in (windows, batches):
                while not q.empty():
                    q.get_nowait()
            for w in workers:
                w.join(timeout=10)

    def _ring_slots(self) -> int:
        slots = self.prefetch + _held() + 1
        if self.output == "dense":
            shape = (slots, self.sampler.batch_size, self.store.n_genes)
            if self._buffers is None or self._buffers.shape != shape:
                # one allocation: pinned memory is rounded up to a power of two per allocation
                self._buffers = _pin(torch.empty(shape, dtype=torch.float32))
        elif self._buffers is None or len(self._buffers) != slots:
            self._buffers = [None] * slots  # CSR slots: allocated at first use, sized by the batches they hold
        return slots

    def _csr_slot(self, slot: int, rows: int, nnz: int):
        """(indptr, indices, data) views of ring slot `slot` for `rows` rows and `nnz` values. Each slot is one
        byte block (one pinned allocation where CUDA exists) holding the three arrays; it grows, with 25 % headroom,
        only when a batch has more values than it ever held, so after the first batches nothing is allocated."""
        index_dtype = self.store.index_dtype
        block = self._buffers[slot]
        capacity = 0 if block is None else (len(block) - 8 * (self.sampler.batch_size + 1)) // (
            4 + index_dtype.itemsize)
        if nnz > capacity:
            capacity = max(nnz + nnz // 4, int(self.store.nnz / max(1, self.store.n_cells) * rows * 1.25))
            block = _pin(torch.empty(8 * (self.sampler.batch_size + 1) + (4 + index_dtype.itemsize) * capacity,
                                     dtype=torch.uint8))
            self._buffers[slot] = block
        raw = block.numpy()
        a = 8 * (self.sampler.batch_size + 1)
        b = a + 4 * capacity
        return (raw[:8 * (rows + 1)].view(np.int64), raw[b:b + index_dtype.itemsize * nnz].view(index_dtype),
                raw[a:a + 4 * nnz].view(np.float32))

    @staticmethod
    def _put(q: queue.Queue, item, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    @staticmethod
    def _get(q: queue.Queue, stop: threading.Event):
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stop

    def _guard(self, work, stop, out: queue.Queue, *args) -> None:
        """Run a worker; its end (None) or its exception travels downstream to the consumer."""
        try:
            work(stop, *args)
            self._put(out, None, stop)
        except _Stop:
            pass
        except BaseException as exc:  # re-raised as itself in the consumer
            try:
                self._put(out, exc, stop)
            except _Stop:
                pass

    @staticmethod
    def _acquire(turn: threading.Semaphore, stop: threading.Event) -> None:
        while not turn.acquire(timeout=0.1):
            if stop.is_set():
                raise _Stop

    def _read_windows(self, stop, epoch: int, start: int, out: queue.Queue, turn: threading.Semaphore) -> None:
        arrays = ShardedArray(self.store.path / "X" / "indices"), ShardedArray(self.store.path / "X" / "data")
        indptr = self.store.indptr
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                for group in self.sampler.windows(epoch, start):
                    self._acquire(turn, stop)
                    rows = np.sort(np.concatenate([r for _, r in group]))
                    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
                    run_lo = rows[np.concatenate(([0], breaks))]
                    run_hi = rows[np.concatenate((breaks - 1, [len(rows) - 1]))] + 1 if len(rows) else run_lo
                    ranges = np.stack([indptr[run_lo], indptr[run_hi]], axis=1)
                    indices, values = (a.read(ranges, pool) for a in arrays)
                    if len(indices) and indices.max() >= self.store.n_genes:
                        raise arrays[0]._fail("c", f"gene index out of range [0, {self.store.n_genes})")
                    local = np.zeros(len(rows) + 1, np.int64)
                    np.cumsum(indptr[rows + 1] - indptr[rows], out=local[1:])
                    # normalised here, on the pool: the densify thread is the busier
                    if self.normalize:
                        values = log1p_per_10k(local, values, pool, self.threads)
                    self._put(out, (group, rows, local, indices, values), stop)
        finally:
            for a in arrays:
                a.close()

    def _densify(self, stop, windows: queue.Queue, out: queue.Queue, free: queue.Queue, epoch: int,
                 turn: threading.Semaphore) -> None:
        while True:
            item = self._get(windows, stop)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            group, rows, local, indices, values = item
            turn.release()
            for step, batch_rows in group:
                positions = np.searchsorted(rows, batch_rows)
                obs = {c: torch.from_numpy(v[batch_rows]) for c, v in self.obs.items()}
                batch = Batch(torch.from_numpy(batch_rows), obs, epoch, step)
                batch.slot = self._get(free, stop)
                if self.output == "dense":
                    x = self._buffers[batch.slot, :len(batch_rows)]
                    scatter_rows(x.numpy(), positions, local, indices, values)
                    batch.x = x
                else:
                    nnz = int((local[positions + 1] - local[positions]).sum())
                    sub = self._csr_slot(batch.slot, len(positions), nnz)
                    gather_rows(positions, local, indices, values, *sub)
                    batch.indptr, batch.indices, batch.data = (torch.from_numpy(a) for a in sub)
                self._put(out, batch, stop)
