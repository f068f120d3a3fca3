"""Dense rows from a CSR matrix on the device, optionally normalising each row to `target_sum` and taking log1p
(the numbers scTab stores, with target_sum 10,000), so that only compact CSR crosses to the GPU.

`csr_to_dense` densifies every row of a CSR batch; `csr_rows_to_dense` densifies the rows `rows` of a larger CSR
(a shard held on the device: the resident loader's batches). One Triton program per output row: a pass over the
row's values for its sum (when normalising), a pass that scatters them into a zeroed output. Indices may be uint16,
int32 or int64; values float32 or integer counts. On CPU tensors the torch reference runs (the loaders' numba
gather is the CPU fast path of the same work). Never imports engine or loaders.
"""
from __future__ import annotations

import torch

from ._triton import jit, log1p, tl
from .dispatch import use_triton

_INDEX_DTYPES = (torch.uint16, torch.int16, torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float32, torch.uint16, torch.int16, torch.int32, torch.uint32, torch.int64)


@jit
def _csr_kernel(indptr_ptr, indices_ptr, data_ptr, rows_ptr, out_ptr, n_genes, target_sum, NORMALIZE: tl.constexpr,
                ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    source = tl.load(rows_ptr + row).to(tl.int64) if ROWS else row.to(tl.int64)
    start = tl.load(indptr_ptr + source).to(tl.int64)
    stop = tl.load(indptr_ptr + source + 1).to(tl.int64)
    row_sum = 1.0
    if NORMALIZE:
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for off in range(start, stop, BLOCK):
            pos = off + tl.arange(0, BLOCK)
            total += tl.load(data_ptr + pos, mask=pos < stop, other=0).to(tl.float32)
        row_sum = tl.sum(total, axis=0)
        row_sum = tl.where(row_sum > 0, row_sum, 1.0)  # a row of explicit zeros stays zero
    for off in range(start, stop, BLOCK):
        pos = off + tl.arange(0, BLOCK)
        inside = pos < stop
        cols = tl.load(indices_ptr + pos, mask=inside, other=0).to(tl.int64)
        values = tl.load(data_ptr + pos, mask=inside, other=0).to(tl.float32)
        if NORMALIZE:
            values = log1p(values / row_sum * target_sum)
        tl.store(out_ptr + row.to(tl.int64) * n_genes + cols, values, mask=inside)


def _check(indptr, indices, data, n_genes, rows=None) -> None:
    for t, name in ((indptr, "indptr"), (indices, "indices"), (data, "data"), (rows, "rows")):
        if name != "rows" or t is not None:
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor")
    if indptr.dtype not in (torch.int32, torch.int64) or (rows is not None and rows.dtype not in (torch.int32,
                                                                                                  torch.int64)):
        raise TypeError(f"indptr and rows must be int32 or int64, got {indptr.dtype}"
                        f"{'' if rows is None else f' and {rows.dtype}'}")
    if indices.dtype not in _INDEX_DTYPES or data.dtype not in _VALUE_DTYPES:
        raise TypeError(f"indices ({indices.dtype}) must be one of {_INDEX_DTYPES}; data ({data.dtype}) one of "
                        f"{_VALUE_DTYPES}")
    if len(indices) != len(data):
        raise ValueError(f"indices ({len(indices)}) and data ({len(data)}) differ in length")
    devices = {t.device for t in (indptr, indices, data, rows) if t is not None}
    if len(indptr) < 1 or len(devices) != 1:
        raise ValueError("indptr, indices, data (and rows) must be non-empty and on one device")
    if n_genes <= 0:
        raise ValueError(f"n_genes must be positive, got {n_genes}")


def csr_rows_to_dense_reference(indptr, indices, data, rows, n_genes: int,
                                target_sum: float | None = None) -> torch.Tensor:
    starts = indptr[:-1] if rows is None else indptr[rows.long()]
    counts = ((indptr[1:] if rows is None else indptr[rows.long() + 1]) - starts).long()
    n_rows = len(counts)
    out_rows = torch.repeat_interleave(torch.arange(n_rows, device=data.device), counts)
    offsets = torch.cumsum(counts, 0) - counts
    positions = (starts.long() - offsets)[out_rows] + torch.arange(int(counts.sum()), device=data.device)
    values = data[positions].to(torch.float32)
    if target_sum is not None:
        sums = torch.zeros(n_rows, device=data.device).index_add_(0, out_rows, values)
        values = torch.log1p(values / torch.where(sums > 0, sums, 1.0)[out_rows] * target_sum)
    out = torch.zeros(n_rows, n_genes, device=data.device)
    out[out_rows, indices[positions].to(torch.int64)] = values
    return out


def csr_to_dense_reference(indptr, indices, data, n_genes: int, target_sum: float | None = None) -> torch.Tensor:
    return csr_rows_to_dense_reference(indptr, indices, data, None, n_genes, target_sum)


def csr_rows_to_dense(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, rows: torch.Tensor | None,
                      n_genes: int, target_sum: float | None = None) -> torch.Tensor:
    """float32 [len(rows), n_genes]: row i is CSR row rows[i] (every row when `rows` is None); with `target_sum`,
    log1p(value / row sum · target_sum)."""
    _check(indptr, indices, data, n_genes, rows)
    if not use_triton(indptr, indices, data, rows):
        return csr_rows_to_dense_reference(indptr, indices, data, rows, n_genes, target_sum)
    n_rows = len(indptr) - 1 if rows is None else len(rows)
    out = torch.zeros(n_rows, n_genes, device=data.device)
    if n_rows:
        _csr_kernel[(n_rows,)](indptr.contiguous(), indices.contiguous(), data.contiguous(),
                               indptr if rows is None else rows.contiguous(), out, n_genes,
                               float(target_sum or 1.0), NORMALIZE=target_sum is not None, ROWS=rows is not None,
                               BLOCK=1024)
    return out


def csr_to_dense(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, n_genes: int,
                 target_sum: float | None = None) -> torch.Tensor:
    """float32 [rows, n_genes] from a CSR triplet; with `target_sum`, log1p(value / row sum · target_sum)."""
    return csr_rows_to_dense(indptr, indices, data, None, n_genes, target_sum)


__all__ = ["csr_rows_to_dense", "csr_rows_to_dense_reference", "csr_to_dense", "csr_to_dense_reference"]
