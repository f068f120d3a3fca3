"""A batch as CSR rows, the form the loader ships and the first layer reads: what every op accepts in place of a
dense [cells, genes] float32 tensor.

On CPU the ops that can work on the nonzeros do (the masked first layer, the reconstruction losses, NB noise,
which adds the stored values to its dense noise); on CUDA the trainer densifies once on the device (`csr_to_dense`,
log1p per `target_sum` fused when the values are raw counts). Never imports engine or loaders.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import prange

from .csr_to_dense import csr_to_dense
from .dispatch import check_matrix

_INDEX_DTYPES = (torch.uint16, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class SparseRows:
    """float32 CSR [len(indptr) − 1, n_genes]: row r holds values data[indptr[r]:indptr[r+1]] at columns
    indices[same]. `target_sum`: None when the values are what the model reads; a total (10,000) when they are raw
    counts, each row to be normalised to that total and log1p'd when densified (`counts` is then True)."""

    indptr: torch.Tensor   # int64 [rows + 1]
    indices: torch.Tensor  # uint16, int16, int32 or int64 [nnz]
    data: torch.Tensor     # float32 [nnz]
    n_genes: int
    target_sum: float | None = None

    def __post_init__(self):
        if self.indptr.dtype != torch.int64 or self.indptr.dim() != 1 or len(self.indptr) < 1:
            raise TypeError(f"indptr must be a non-empty 1-D int64 tensor, got {self.indptr.dtype} "
                            f"{tuple(self.indptr.shape)}")
        if self.indices.dtype not in _INDEX_DTYPES or self.data.dtype != torch.float32:
            raise TypeError(f"indices must be one of {_INDEX_DTYPES} (got {self.indices.dtype}) and data float32 "
                            f"(got {self.data.dtype})")
        if self.indices.shape != self.data.shape or self.indices.dim() != 1:
            raise ValueError(f"indices {tuple(self.indices.shape)} and data {tuple(self.data.shape)} must be 1-D "
                             "and of one length")
        if not self.indptr.device == self.indices.device == self.data.device:
            raise ValueError("indptr, indices and data must be on one device")

    @property
    def counts(self) -> bool:
        """The values are raw counts, still to be normalised."""
        return self.target_sum is not None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.indptr) - 1, self.n_genes

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def numel(self) -> int:
        return len(self) * self.n_genes

    @property
    def nnz(self) -> int:
        return len(self.data)

    requires_grad = False  # data, never a parameter

    def detach(self) -> "SparseRows":
        return self

    def to(self, device, non_blocking: bool = False) -> "SparseRows":
        return SparseRows(*(t.to(device, non_blocking=non_blocking) for t in (self.indptr, self.indices, self.data)),
                          self.n_genes, self.target_sum)

    def to_dense(self) -> torch.Tensor:
        """The dense float32 batch (normalised and log1p'd when the values are counts)."""
        return csr_to_dense(self.indptr, self.indices, self.data, self.n_genes, self.target_sum)

    def numpy(self):
        """(indptr, indices, data) as numpy arrays sharing memory (CPU only)."""
        return self.indptr.numpy(), self.indices.numpy(), self.data.numpy()


def check_input(x, name: str = "x") -> None:
    """A batch: a dense float32 matrix or SparseRows."""
    if not isinstance(x, SparseRows):
        check_matrix(x, name)


def dense(x) -> torch.Tensor:
    """x as a dense tensor (densified if it is SparseRows)."""
    return x.to_dense() if isinstance(x, SparseRows) else x


@numba.njit(parallel=True, cache=True)
def add_rows(out, indptr, indices, data, sign):
    """out[r, indices[k]] += sign · data[k] for every stored value k of row r: a dense matrix plus (or minus) the
    rows of a CSR, without the dense rows."""
    for r in prange(out.shape[0]):
        row = out[r]
        for k in range(indptr[r], indptr[r + 1]):
            row[indices[k]] += sign * data[k]


def add_to(out: torch.Tensor, x: SparseRows, sign: float = 1.0) -> torch.Tensor:
    """out += sign · x, in place, on CPU tensors (one numba pass over x's stored values)."""
    add_rows(out.numpy(), *x.numpy(), np.float32(sign))
    return out


class _MinusRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, x):
        return add_to(pred.detach().contiguous().clone(), x, -1.0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def difference(pred: torch.Tensor, x) -> torch.Tensor:
    """pred − x, differentiable in pred; with SparseRows only the nonzeros are subtracted (no dense x is made)."""
    if not isinstance(x, SparseRows) or x.counts or x.device != pred.device:
        return pred - dense(x).to(pred.device)
    if pred.device.type == "cpu" and pred.dtype == torch.float32:
        return _MinusRows.apply(pred, x)  # one numba pass; torch's accumulating index_put is ~10x slower on CPU
    rows = torch.repeat_interleave(torch.arange(len(x), device=x.device), x.indptr.diff())
    return pred.index_put((rows, x.indices.to(torch.int64)), -x.data, accumulate=True)


__all__ = ["SparseRows", "add_to", "check_input", "dense", "difference"]
