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
    """A reused CSR buffer for rows gathered raw, to be normalised before they go into a ring (a resident shard
    holds counts as stored)."""

    def __init__(self):
        self.indptr, self.indices, self.values = (np.empty(0, d) for d in (np.int64, np.uint16, np.float32))

    def normalised(self, positions, indptr, indices, values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows `positions` as a CSR of their own, values log1p per 10,000 (loaders/densify.py, bit for bit)."""
        nnz = int((indptr[positions + 1] - indptr[positions]).sum())
        if len(self.indptr) < len(positions) + 1:
            self.indptr = np.empty(len(positions) + 1, np.int64)
        if len(self.indices) < nnz or self.indices.dtype != indices.dtype or self.values.dtype != values.dtype:
            self.indices, self.values = np.empty(nnz + nnz // 4, indices.dtype), np.empty(nnz + nnz // 4, values.dtype)
        parts = self.indptr[:len(positions) + 1], self.indices[:nnz], self.values[:nnz]
        gather_rows(positions, indptr, indices, values, *parts)
        return parts[0], parts[1], log1p_per_10k(parts[0], parts[2])


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
             normalize: bool = False) -> dict:
        """Rows `positions` of the CSR (indptr, indices, values) as slot `slot`'s dense batch: {"x": tensor}; with
        `normalize`, counts become log1p per 10,000 on the way."""
        x = self.blocks[slot, :len(positions)]
        if normalize:
            indptr, indices, values = self.scratch.normalised(positions, indptr, indices, values)
            positions = np.arange(len(positions), dtype=np.int64)
        scatter_rows(x.numpy(), positions, indptr, indices, values)
        return {"x": x}


class CsrRing:
    """One byte block per slot holding a batch's indptr (int64), values (float32) and indices (the store's dtype).
    A slot is allocated at its first use, sized for `values_per_row` values a row with 25 % headroom, and grows (with
    the same headroom) only when a batch holds more values than it has room for."""

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
            capacity = max(nnz + nnz // 4, int(self.values_per_row * rows * 1.25))
            block = _empty(self._offsets_bytes() + (4 + self.index_dtype.itemsize) * capacity, torch.uint8, self.pin)
            self.blocks[slot] = block
        raw = block.numpy()
        a = self._offsets_bytes()
        b = a + 4 * capacity
        return (raw[:8 * (rows + 1)].view(np.int64), raw[b:b + self.index_dtype.itemsize * nnz].view(self.index_dtype),
                raw[a:a + 4 * nnz].view(np.float32))

    def fill(self, slot: int, positions: np.ndarray, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
             normalize: bool = False) -> dict:
        """Rows `positions` of the CSR (indptr, indices, values) gathered into slot `slot`: the batch's indptr,
        indices and data tensors; with `normalize`, counts become log1p per 10,000 on the way."""
        if normalize:
            indptr, indices, values = self.scratch.normalised(positions, indptr, indices, values)
            positions = np.arange(len(positions), dtype=np.int64)
        nnz = int((indptr[positions + 1] - indptr[positions]).sum())
        parts = self.views(slot, len(positions), nnz)
        gather_rows(positions, indptr, indices, values, *parts)
        return dict(zip(("indptr", "indices", "data"), (torch.from_numpy(a) for a in parts)))
