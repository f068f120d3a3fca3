"""BatchStream: dense (or CSR) batches of cells from a cell store, straight into a training loop.

A sampler decides which rows (`BlockShuffleSampler` by default; any object with its interface may be passed);
this file turns them into batches. A reader thread decodes one shuffle window at a time (each needed chunk once,
on a small thread pool) and normalises counts (unless `normalize=False`: then the values stay as stored, e.g. for
a GPU that normalises while densifying); an assembly thread puts each batch into a ring of reused buffers
(loaders/rings.py): scattered into dense blocks (output="dense") or gathered into CSR blocks (output="csr"). A
yielded batch's buffers stay valid until `held` more batches have been requested (by default two when they are
pinned for an asynchronous host-to-device copy, `pin_memory=True`, one otherwise; a consumer that keeps several
batches, as gradient accumulation does, asks for more). An exception in a worker reaches the consumer as itself.
What the stream does is said by its arguments (rank and world size, where not given, are RANK and WORLD_SIZE of the
environment, as a launcher sets them); it asks no device. Every rank walks the same global order and takes its slice
of every global batch (loaders/sampler.py), resident or streaming alike: where the cells come from never changes
which cells a step sees. Never imports engine or kernels.
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
from .densify import log1p_per_10k
from .errors import InputError
from .resident import ResidentShard, choose
from .rings import CsrRing, DenseRing
from .sampler import BlockShuffleSampler
from .store import CellStore, open_store

OUTPUTS = ("dense", "csr")


@dataclass
class Batch:
    """One batch: `x` dense float32 [n, genes] (output="dense") or the CSR triplet (output="csr": `indptr` int64,
    `indices` the store's index dtype (uint16 up to 65,535 genes), `data` float32), `obs` int64 codes by column,
    `index` the store rows. `epoch`/`step` say where it sits in the stream. A device-resident stream's batches carry
    `rows` and `resident` instead of values (kernels.csr_rows_to_dense densifies them where they are)."""

    index: torch.Tensor
    obs: dict[str, torch.Tensor]
    epoch: int
    step: int
    x: torch.Tensor | None = None
    indptr: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    data: torch.Tensor | None = None
    rows: torch.Tensor | None = None             # a device-resident batch: its rows of the shard
    resident: "ResidentShard | None" = field(default=None, repr=False)
    slot: int = field(default=-1, repr=False)

    def __len__(self) -> int:
        return len(self.index)


class _Stop(Exception):
    pass


def _from_environment(key: str, given: int | None) -> int | None:
    if given is not None or key not in os.environ:
        return given
    try:
        return int(os.environ[key])
    except ValueError:
        raise InputError(f"{key}={os.environ[key]!r}", "is not an integer", f"unset {key}, or pass it to BatchStream")


def _sampler(store: CellStore, split: str, sampler, batch_size, seed, rank, world_size, drop_last, accumulation):
    """The given sampler, checked against the split, or the default one for the given parameters (exclusive with a
    sampler, as in torch's DataLoader). Rank and world size not given: RANK and WORLD_SIZE of the environment."""
    start, stop = store.split(split)
    given = {k: v for k, v in dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                                   drop_last=drop_last, accumulation=accumulation).items() if v is not None}
    if sampler is None:
        environment = {k: v for k, v in (("rank", _from_environment("RANK", rank)),
                                         ("world_size", _from_environment("WORLD_SIZE", world_size))) if v is not None}
        return BlockShuffleSampler(start, stop, **{"drop_last": split == "train", **given, **environment})
    if given:
        raise ValueError(f"pass either a sampler or {sorted(given)}, not both: the sampler holds them")
    if not start <= sampler.start <= sampler.stop <= stop:
        raise ValueError(f"the sampler covers rows [{sampler.start}, {sampler.stop}), outside the {split!r} split "
                         f"[{start}, {stop})")
    return sampler


class BatchStream:
    def __init__(self, store: str | Path | CellStore, split: str = "train", batch_size: int | None = None,
                 seed: int | None = None, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool | None = None, *, accumulation: int | None = None, sampler=None,
                 output: str = "dense", columns=None,
                 normalize: bool = True, pin_memory: bool = False, held: int | None = None, prefetch: int = 1,
                 threads: int = 2, resident: str = "off", device=None, reserve: int = 0, progress: bool = False):
        """`batch_size` (8,192 cells per rank and micro-batch), `seed` (0), `rank` of `world_size` (RANK and
        WORLD_SIZE of the environment, else 0 of 1), `accumulation` (micro-batches per step, 1) and `drop_last` (for
        the train split) configure the default sampler; or pass `sampler`. `pin_memory`: batches in pinned memory (only where CUDA
        exists) for an asynchronous copy to the GPU. `held`: how many yielded batches stay valid (see above).
        `resident`: "off" (stream from disk), "host", "device" (`device`; `reserve`: its bytes the model needs) or
        "auto" (loaders/resident.py decides; `residence` and `residence_reason` say what it chose). A resident
        stream holds the whole split (every rank's slices of every epoch come from all of it)."""
        self.store = open_store(store)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        self.sampler = _sampler(self.store, split, sampler, batch_size, seed, rank, world_size, drop_last,
                                accumulation)
        self.residence, self.residence_reason = choose(resident, self.store, self.sampler.start, self.sampler.stop,
                                                       device, reserve)
        self.split, self.output, self.threads, self.prefetch = split, output, max(1, threads), max(1, prefetch)
        self.normalize = normalize and self.store.value_kind == "counts"
        # where counts become log1p: batch by batch into the ring (CSR batches, whose windows then hold 2-byte raw
        # counts: -180 MB at 8,192 cells; and a resident shard, kept as stored), or for a whole window on the
        # reader's pool (dense batches: scattered straight from it, 1.4x faster than a gather first)
        self._late = output == "csr" or self.residence != "off"
        self.pin_memory = pin_memory
        self.held = held if held is not None else 2 if pin_memory else 1
        if self.held < 1:
            raise ValueError(f"held must be at least 1, got {held}")
        available = self.store.obs_columns
        if columns is None:  # the label most training needs, where the store has it
            columns = [c for c in ("cell_type",) if c in available]
        missing = [c for c in columns if c not in available]
        if missing:
            raise InputError(self.store.path / "obs.parquet", f"no obs column(s) {missing}",
                             f"choose from {sorted(available)}")
        self.obs = {c: self.store.obs_codes(c).astype(np.int64) for c in columns}
        self.epoch, self.step = 0, 0
        self._ring: DenseRing | CsrRing | None = None
        self._held: deque = deque()  # slots of yielded batches the consumer may still read: across passes too
        self._shard: ResidentShard | None = None
        self._target, self._progress = (device if self.residence == "device" else None), progress

    @property
    def shard(self) -> ResidentShard | None:
        """The resident share (`load_share`), or None when streaming."""
        return self.load_share() if self.residence != "off" else None

    def load_share(self) -> ResidentShard:
        """Read this rank's share into memory, if not done yet: at the first batch, or when called (a trainer takes
        its run folder's lock first)."""
        if self._shard is None:
            self._shard = ResidentShard.load(self.store, self.sampler.start, self.sampler.stop, self._target,
                                             self.threads, self._progress)
            if self._target is not None:  # the labels on the device too: a batch needs nothing from the host
                self.obs = {c: torch.from_numpy(v).to(self._target) for c, v in self.obs.items()}
        return self._shard

    # --- the contract ----------------------------------------------------------------------------------
    @property
    def categories(self) -> dict[str, list[str]]:
        """The labels behind `batch.obs`'s codes, per categorical column (code i is label i; −1: unlabelled)."""
        return {c: self.store.categories[c] for c in self.obs if c in self.store.categories}

    def __len__(self) -> int:
        return self.sampler.steps()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (a complete pass also rewinds to it)."""
        self.epoch, self.step = int(epoch), 0

    def endless(self):
        """Batches epoch after epoch from the current position (each batch says its epoch): a training loop is a
        plain `for` over this, and `state_dict()` stays exact at every batch."""
        if len(self) == 0:
            raise InputError(self.store.path, f"the {self.split!r} split gives this rank no batch of "
                             f"{self.sampler.batch_size} cells", "use a smaller --batch-size or fewer ranks")
        while True:
            yield from self
            self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        """The position as the epoch and the cells of its global order consumed by all ranks together: the same
        on every rank, and meaningful on any number of ranks with the same global batch."""
        return {"epoch": self.epoch, "position": self.sampler.cells_before(self.step), "split": self.split,
                "store": self.store.checksum, **self.sampler.identity()}

    def state_after(self, batch: Batch) -> dict:
        """state_dict() as it stands once `batch` is consumed: what a checkpoint holds when the consumer reads
        ahead of the step it trains (the CUDA feed copies the next batch while this one trains)."""
        return {**self.state_dict(), "epoch": batch.epoch, "position": self.sampler.cells_before(batch.step + 1)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in [k for k in mine if k not in ("epoch", "position")]:
            if state.get(key) != mine[key]:
                fix = ("resume with the same global batch (--batch-size × --gradient-accumulation × ranks)"
                       if key == "global_batch" else "resume with the same store, batch and sampling")
                raise InputError(self.store.path, f"cannot resume the loader: the saved position has {key}="
                                 f"{state.get(key)!r}, this launch {mine[key]!r}; the remaining batches would differ",
                                 fix)
        epoch, position = state.get("epoch"), state.get("position")
        micro = self.sampler.micro_cells
        step = -(-position // micro) if isinstance(position, int) else None
        if not (isinstance(epoch, int) and epoch >= 0 and step is not None and 0 <= step <= len(self)
                and self.sampler.cells_before(step) == position):
            raise InputError(self.store.path, f"cannot resume the loader: position epoch={epoch!r}, {position!r} "
                             f"cells is not a micro-batch boundary within the {len(self)} micro-batches of "
                             f"{micro} cells of an epoch", "resume from an intact checkpoint")
        self.epoch, self.step = epoch, step

    # --- the pipeline ----------------------------------------------------------------------------------
    def _make_ring(self) -> DenseRing | CsrRing:
        slots = self.prefetch + self.held + 1
        if self._ring is None or len(self._ring) != slots:
            self._held.clear()
            s, store = self.sampler, self.store
            self._ring = (DenseRing(slots, s.batch_size, store.n_genes, self.pin_memory) if self.output == "dense"
                          else CsrRing(slots, s.batch_size, store.index_dtype, store.nnz / max(1, store.n_cells),
                                       self.pin_memory))
        return self._ring

    def __iter__(self):
        if self.residence != "off":
            self.load_share()  # here, in the consumer's thread, before the pipeline starts
        if self.residence == "device":
            yield from self._device_batches()
            return
        epoch, start = self.epoch, self.step
        ring = self._make_ring()
        stop = threading.Event()
        windows: queue.Queue = queue.Queue(maxsize=1)
        turn = threading.Semaphore(1)  # the reader starts a window only once the previous one is taken: 2 alive
        batches: queue.Queue = queue.Queue(maxsize=self.prefetch)
        free: queue.Queue = queue.Queue()
        for slot in range(len(ring)):
            if slot not in self._held:  # the last batches of a previous pass (an epoch's end) stay untouched
                free.put(slot)
        reader = self._resident_windows if self.residence != "off" else self._read_windows
        workers = [threading.Thread(target=self._guard, args=(reader, stop, windows, epoch, start, windows, turn),
                                    daemon=True),
                   threading.Thread(target=self._guard, args=(self._assemble, stop, batches, ring, windows, batches,
                                                              free, epoch, turn), daemon=True)]
        for w in workers:
            w.start()
        try:
            yield from self._consume(batches, free)
        finally:
            stop.set()
            for q in (windows, batches):
                while not q.empty():
                    q.get_nowait()
            for w in workers:
                w.join(timeout=10)

    def _consume(self, batches: queue.Queue, free: queue.Queue):
        held = self._held
        while True:
            item = batches.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            held.append(item.slot)
            if len(held) > self.held:
                free.put(held.popleft())
            self.step = item.step + 1
            yield item
        if self.step >= len(self):
            self.step = 0

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
        """Decode each shuffle window's rows once: (batches, sorted rows, their CSR)."""
        arrays = ShardedArray(self.store.path / "X" / "indices"), ShardedArray(self.store.path / "X" / "data")
        indptr = self.store.indptr
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                for group in self.sampler.windows(epoch, start):
                    self._acquire(turn, stop)
                    rows = np.sort(np.concatenate([r for _, r in group]))
                    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
                    starts = np.concatenate(([0], breaks)) if len(rows) else np.zeros(0, np.int64)
                    run_lo = rows[starts]
                    run_hi = rows[np.concatenate((breaks - 1, [len(rows) - 1]))] + 1 if len(rows) else run_lo
                    ranges = np.stack([indptr[run_lo], indptr[run_hi]], axis=1)
                    indices, values = (a.read(ranges, pool) for a in arrays)
                    if len(indices) and indices.max() >= self.store.n_genes:
                        raise arrays[0]._fail("c", f"gene index out of range [0, {self.store.n_genes})")
                    local = np.zeros(len(rows) + 1, np.int64)
                    np.cumsum(indptr[rows + 1] - indptr[rows], out=local[1:])
                    # normalised here, on the pool: the assembly thread is the busier
                    if self.normalize and not self._late:
                        values = log1p_per_10k(local, values, pool, self.threads)
                    self._put(out, (group, rows, local, indices, values), stop)
        finally:
            for a in arrays:
                a.close()

    def _resident_windows(self, stop, epoch: int, start: int, out: queue.Queue, turn: threading.Semaphore) -> None:
        """The resident split as one window: nothing to decode; its values are normalised batch by batch."""
        shard = self.shard
        rows = np.arange(shard.start, shard.stop, dtype=np.int64)
        for group in self.sampler.windows(epoch, start):
            self._acquire(turn, stop)
            self._put(out, (group, rows, shard.indptr, shard.indices, shard.data), stop)

    def _device_batches(self):
        """Batches of a split held on the device: each window's rows copied there once, each batch a slice of them.
        Nothing is assembled here: `rows` and `resident` tell the consumer what to densify
        (kernels.csr_rows_to_dense)."""
        epoch, start, shard = self.epoch, self.step, self.shard
        device = shard.data.device
        for step, batch_rows in self.sampler.batches(epoch, start):
            rows = torch.from_numpy(batch_rows - shard.start).to(device, non_blocking=True)
            index = rows + shard.start
            yield Batch(index, {c: v[index] for c, v in self.obs.items()}, epoch, step, rows=rows, resident=shard)
            self.step = step + 1
        if self.step >= len(self):
            self.step = 0

    def _assemble(self, stop, ring, windows: queue.Queue, out: queue.Queue, free: queue.Queue, epoch: int,
                  turn: threading.Semaphore) -> None:
        """Each batch of each decoded window into a free ring slot (normalised on the way where `_late`). From a
        resident shard nothing is being decoded, so the copy runs on all `threads`; streaming, it stays on this one
        thread beside the decode pool, which was as fast in A/B runs on 2 cores."""
        resident = self.residence != "off"
        parts = self.threads if resident else 1
        with ThreadPoolExecutor(parts) as pool:
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
                    slot = self._get(free, stop)
                    fields = ring.fill(slot, positions, local, indices, values, self.normalize and self._late,
                                       pool, parts)
                    self._put(out, Batch(torch.from_numpy(batch_rows), obs, epoch, step, slot=slot, **fields), stop)
