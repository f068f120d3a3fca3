"""On-device densification of a CSR batch, optionally normalising each row to 10,000 and taking log1p
(the numbers scTab stores), so the loader can ship compact CSR to the GPU.

One Triton program per row: a pass over the row's values for its sum (when normalising), a pass that
scatters them into a zeroed output. Indices may be uint16, int32 or int64; values float32 or integer
counts. Never imports engine or loaders.
"""
from __future__ import annotations

import torch

from ._triton import constexpr, jit, log1p, tl
from .dispatch import use_triton

TARGET_SUM = 1e4
_TARGET_SUM = constexpr(TARGET_SUM)  # what the kernel reads
_INDEX_DTYPES = (torch.uint16, torch.int16, torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float32, torch.uint16, torch.int16, torch.int32, torch.uint32, torch.int64)


@jit
def _csr_kernel(indptr_ptr, indices_ptr, data_ptr, out_ptr, n_genes, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.load(indptr_ptr + row).to(tl.int64)
    stop = tl.load(indptr_ptr + row + 1).to(tl.int64)
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
            values = log1p(values / row_sum * _TARGET_SUM)
        tl.store(out_ptr + row.to(tl.int64) * n_genes + cols, values, mask=inside)


def _check(indptr, indices, data, n_genes) -> None:
    for t, name in ((indptr, "indptr"), (indices, "indices"), (data, "data")):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor")
    if indptr.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indptr must be int32 or int64, got {indptr.dtype}")
    if indices.dtype not in _INDEX_DTYPES or data.dtype not in _VALUE_DTYPES:
        raise TypeError(f"indices ({indices.dtype}) must be one of {_INDEX_DTYPES}; data ({data.dtype}) one of "
                        f"{_VALUE_DTYPES}")
    if len(indices) != len(data):
        raise ValueError(f"indices ({len(indices)}) and data ({len(data)}) differ in length")
    if len(indptr) < 1 or not (indptr.device == indices.device == data.device):
        raise ValueError("indptr, indices and data must be non-empty and on one device")
    if n_genes <= 0:
        raise ValueError(f"n_genes must be positive, got {n_genes}")


def csr_to_dense_reference(indptr, indices, data, n_genes: int, normalize_log1p: bool = False) -> torch.Tensor:
    n_rows = len(indptr) - 1
    counts = (indptr[1:] - indptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(n_rows, device=data.device), counts)
    values = data.to(torch.float32)
    if normalize_log1p:
        sums = torch.zeros(n_rows, device=data.device).index_add_(0, rows, values)
        values = torch.log1p(values / torch.where(sums > 0, sums, 1.0)[rows] * TARGET_SUM)
    out = torch.zeros(n_rows, n_genes, device=data.device)
    out[rows, indices.to(torch.int64)] = values
    return out


def csr_to_dense(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, n_genes: int,
                 normalize_log1p: bool = False) -> torch.Tensor:
    """float32 [rows, n_genes] from a CSR triplet; with `normalize_log1p`, log1p(value / row sum · 10,000)."""
    _check(indptr, indices, data, n_genes)
    if not use_triton(indptr, indices, data):
        if data.device.type == "cpu" and data.dtype == torch.float32 and not normalize_log1p:
            from .cpu import csr_scatter  # ~10x torch's index_put on CPU

            out = torch.empty(len(indptr) - 1, n_genes)
            csr_scatter(indptr.numpy(), indices.numpy(), data.numpy(), out.numpy())
            return out
        return csr_to_dense_reference(indptr, indices, data, n_genes, normalize_log1p)
    n_rows = len(indptr) - 1
    out = torch.zeros(n_rows, n_genes, device=data.device)
    if n_rows:
        _csr_kernel[(n_rows,)](indptr.contiguous(), indices.contiguous(), data.contiguous(), out, n_genes,
                               NORMALIZE=normalize_log1p, BLOCK=1024)
    return out


__all__ = ["csr_to_dense", "csr_to_dense_reference"]
