"""The reused buffers batches are assembled in, one kind per output: `DenseRing` scatters a batch's rows into dense
float32 blocks, `CsrRing` gathers them into compact CSR blocks. A ring has a fixed number of slots; the stream hands
out a slot per batch and takes it back once the consumer can no longer be reading it, so after warm-up nothing is
allocated and no page is faulted in.

Where batches are copied to a GPU the blocks are pinned: each ring allocates one pinned block per slot (CSR) or one
for all slots (dense), because PyTorch rounds every pinned allocation up to a power of two. Never imports engine or
kernels.
"""
from __future__ import annotations

import numpy as np
import torch

from .densify import gather_rows, log1p_per_10k, scatter_rows


class _Scratch:
    """Reused buffers for rows gathered raw, to be normalised on their way into a ring (a resident shard holds
    counts as stored)."""

    def __init__(self):
        self.indptr, self.indices = np.empty(0, np.int64), np.empty(0, np.uint16)
        self.raw, self.values = np.empty(0, np.uint16), np.empty(0, np.float32)

    def _room(self, name: str, n: int, dtype) -> np.ndarray:
        buf = getattr(self, name)
        if len(buf) < n or buf.dtype != dtype:
            buf = np.empty(n + n // 4, dtype)
            setattr(self, name, buf)
        return buf[:n]

    def raw_values(self, nnz: int, dtype) -> np.ndarray:
        return self._room("raw", nnz, dtype)

    def normalised(self, positions, indptr, indices, values, pool, parts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows `positions` as a CSR of their own, values log1p per 10,000 (loaders/densify.py, bit for bit)."""
        nnz = int((indptr[positions + 1] - indptr[positions]).sum())
        own = (self._room("indptr", len(positions) + 1, np.int64), self._room("indices", nnz, indices.dtype),
               self.raw_values(nnz, values.dtype))
        gather_rows(positions, indptr, indices, values, *own, pool, parts)
        return own[0], own[1], log1p_per_10k(own[0], own[2], pool, parts, self._room("values", nnz, np.float32))


def _empty(shape, dtype, pin: bool) -> torch.Tensor:
    block = torch.empty(shape, dtype=dtype)
    return block.pin_memory() if pin else block


class DenseRing:
    """slots × [batch_size, n_genes] float32 in one block; `fill` zeroes and fills each row in one pass."""

    def __init__(self, slots: int, batch_size: int, n_genes: int, pin: bool = False):
        self.blocks = _empty((slots, batch_size, n_genes), torch.float32, pin)
        self.scratch = _Scratch()

    def __len__(self) -> int:
        return len(self.blocks)

    def fill(self, slot: int, positions: np.ndarray, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
             normalize: bool = False, pool=None, parts: int = 1) -> dict:
        """Rows `positions` of the CSR (indptr, indices, values) as slot `slot`'s dense batch: {"x": tensor}; with
        `normalize`, counts become log1p per 10,000 on the way. The rows are split over `parts` threads of `pool`."""
        x = self.blocks[slot, :len(positions)]
        if normalize:
            indptr, indices, values = self.scratch.normalised(positions, indptr, indices, values, pool, parts)
            positions = np.arange(len(positions), dtype=np.int64)
        scatter_rows(x.numpy(), positions, indptr, indices, values, pool, parts)
        return {"x": x}


class CsrRing:
    """One byte block per slot holding a batch's indptr (int64), values (float32) and indices (the store's dtype).
    A slot is allocated at its first use, sized for `values_per_row` values a row with 5 % + 2/√rows headroom (the
    values of a batch of n cells vary by about 1/√n of their mean: 5 % covers thousands of cells, the second term a
    few dozen), and grows (with 25 % headroom) only when a batch holds more values than it has room for."""

    def __init__(self, slots: int, batch_size: int, index_dtype: np.dtype, values_per_row: float, pin: bool = False):
        self.blocks: list[torch.Tensor | None] = [None] * slots
        self.batch_size, self.index_dtype, self.pin = batch_size, np.dtype(index_dtype), pin
        self.values_per_row, self.scratch = values_per_row, _Scratch()

    def __len__(self) -> int:
        return len(self.blocks)

    def _offsets_bytes(self) -> int:
        return 8 * (self.batch_size + 1)

    def _capacity(self, block: torch.Tensor | None) -> int:
        if block is None:
            return 0
        return (len(block) - self._offsets_bytes()) // (4 + self.index_dtype.itemsize)

    def views(self, slot: int, rows: int, nnz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, indices, values) arrays of slot `slot` for `rows` rows and `nnz` values."""
        block = self.blocks[slot]
        capacity = self._capacity(block)
        if nnz > capacity:
            capacity = max(nnz + nnz // 4 if block is not None else nnz, int(self.values_per_row * rows * (1.05 + 2 / rows ** 0.5)))
            block = _empty(self._offsets_bytes() + (4 + self.index_dtype.itemsize) * capacity, torch.uint8, self.pin)
            self.blocks[slot] = block
        raw = block.numpy()
        a = self._offsets_bytes()
        b = a + 4 * capacity
        return (raw[:8 * (rows + 1)].view(np.int64), raw[b:b + self.index_dtype.itemsize * nnz].view(self.index_dtype),
                raw[a:a + 4 * nnz].view(np.float32))

    def fill(self, slot: int, positions: np.ndarray, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
             normalize: bool = False, pool=None, parts: int = 1) -> dict:
        """Rows `positions` of the CSR (indptr, indices, values) gathered into slot `slot`: the batch's indptr,
        indices and data tensors; with `normalize`, counts become log1p per 10,000 on the way (gathered raw beside
        the slot, normalised into it). The rows are split over `parts` threads of `pool`."""
        nnz = int((indptr[positions + 1] - indptr[positions]).sum())
        out = self.views(slot, len(positions), nnz)
        if normalize:
            raw = self.scratch.raw_values(nnz, values.dtype)
            gather_rows(positions, indptr, indices, values, out[0], out[1], raw, pool, parts)
            log1p_per_10k(out[0], raw, pool, parts, out[2])
        else:
            gather_rows(positions, indptr, indices, values, *out, pool, parts)
        return dict(zip(("indptr", "indices", "data"), (torch.from_numpy(a) for a in out)))
