"""Resident splits: a split read from the store once and held as CSR (int64 offsets, the store's uint16 indices,
values as stored) in host memory or on the rank's GPU, so that every epoch after the first is served at memory speed
(loaders/stream.py's `resident=`). Every rank holds the whole split: each epoch's global order gives every rank
slices from all of it, and the cells a step sees must not depend on where they are held.

`choose` decides where a split goes: `device` when it fits in what the GPU has free beside the model, `host` when it
fits, for every rank on the node that holds a copy (`sharing`), in a share of the available RAM, else streaming from
disk; it says which and why. Several ranks decide once together (engine/trainer.py). Never imports engine or kernels.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .chunks import ShardedArray
from .errors import InputError
from .store import CellStore

RESIDENCES = ("auto", "off", "host", "device")
HOST_SHARE = 0.5     # of MemAvailable: the rest is the process's own and the page cache's
DEVICE_SHARE = 0.8   # of the GPU memory free beside what the model reserves
BLOCK_VALUES = 1 << 24  # values decoded per step of the load (its progress bar's unit of work)


def shard_bytes(store: CellStore, start: int, stop: int) -> int:
    """What rows [start, stop) occupy resident: offsets, indices and values."""
    values = int(store.indptr[stop] - store.indptr[start])
    value_size = np.dtype(str(store._data.dtype)).itemsize
    return 8 * (stop - start + 1) + values * (store.index_dtype.itemsize + value_size)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def choose(want: str, store: CellStore, start: int, stop: int, device: torch.device | None,
           reserve: int = 0, sharing: int = 1) -> tuple[str, str]:
    """(where: "device" | "host" | "off", why) for rows [start, stop). `reserve`: GPU bytes the model and optimiser
    need; `sharing`: processes on this machine that each hold a copy in RAM. An explicit "host" or "device" that
    does not fit is refused with the numbers."""
    import psutil

    if want not in RESIDENCES:
        raise InputError("--resident", f"{want!r} is not one of {RESIDENCES}", f"choose one of {list(RESIDENCES)}")
    size = shard_bytes(store, start, stop)
    if want == "off":
        return "off", "streaming from disk (--resident off)"
    gpu = device is not None and torch.device(device).type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] - reserve if gpu else 0
    if want == "device" and device is None:
        raise InputError("--resident device", "no device to hold the share", "use --resident host or auto")
    if gpu and want in ("auto", "device") and size <= DEVICE_SHARE * free:
        return "device", f"resident on the GPU: the split is {_gb(size)}, {_gb(free)} free beside the model"
    if want == "device" and gpu:
        raise InputError("--resident device", f"the split is {_gb(size)}; the GPU has {_gb(free)} free beside "
                         f"the model, of which {DEVICE_SHARE:.0%} may hold data", "use --resident host or auto")
    available = psutil.virtual_memory().available // max(1, sharing)
    if size <= HOST_SHARE * available:  # a CPU "device" holds it in RAM too, as torch tensors
        return ("device" if want == "device" else "host"), (f"resident in RAM: the split is {_gb(size)}, "
                                                             f"{_gb(available)} available to each of {sharing} "
                                                             "process(es) on this machine")
    if want in ("host", "device"):
        raise InputError(f"--resident {want}", f"the split is {_gb(size)}; {_gb(available)} of RAM is available to "
                         f"each of {sharing} process(es) on this machine, of which {HOST_SHARE:.0%} may hold data",
                         "use --resident auto (streams from disk) or fewer ranks per machine")
    return "off", (f"streaming from disk: the split ({_gb(size)}) does not fit in {HOST_SHARE:.0%} of the "
                   f"{_gb(available)} of RAM available to each of {sharing} process(es)" + (" nor on the GPU" if gpu
                                                                                            else ""))


@dataclass
class ResidentShard:
    """Rows [start, stop) of a store as CSR: `indptr` int64 (from 0), `indices` and `data` as stored; numpy arrays
    on the host (batches are gathered from them into the stream's ring, pinned where CUDA exists), torch tensors on a
    device."""

    start: int
    stop: int
    indptr: np.ndarray | torch.Tensor
    indices: np.ndarray | torch.Tensor
    data: np.ndarray | torch.Tensor

    def __len__(self) -> int:
        return self.stop - self.start

    @classmethod
    def load(cls, store: CellStore, start: int, stop: int, device: torch.device | None = None, threads: int = 2,
             progress: bool = False) -> "ResidentShard":
        """Decode the rows once (chunks in parallel, each checked as when streaming) into host arrays, then copy
        them to `device` if one is given."""
        lo, hi = int(store.indptr[start]), int(store.indptr[stop])
        arrays = [ShardedArray(store.path / "X" / name) for name in ("indices", "data")]
        out = [np.empty(hi - lo, a.dtype) for a in arrays]
        try:
            with ThreadPoolExecutor(threads) as pool, tqdm(total=hi - lo, desc="resident", unit="value",
                                                           unit_scale=True, disable=not progress) as bar:
                for a in range(lo, hi, BLOCK_VALUES):
                    b = min(a + BLOCK_VALUES, hi)
                    for array, target in zip(arrays, out):
                        array.read(np.array([[a, b]], np.int64), pool, target[a - lo:b - lo])
                    bar.update(b - a)
        finally:
            for array in arrays:
                array.close()
        if len(out[0]) and int(out[0].max()) >= store.n_genes:
            raise InputError(store.path / "X/indices", "gene index out of range; the store is damaged",
                             "reconvert the source, or restore the store from a copy")
        indptr = store.indptr[start:stop + 1] - lo
        if device is None:
            return cls(start, stop, indptr, *out)
        return cls(start, stop, *(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (indptr, *out)))

    @property
    def on_device(self) -> bool:
        return isinstance(self.data, torch.Tensor)
