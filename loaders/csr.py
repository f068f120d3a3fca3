"""Vectorised CSR helpers shared by the converters: row gathers, dense-to-CSR, column remapping.

Pure numpy; never imports engine or kernels.
"""
from __future__ import annotations

import numpy as np


def take_rows(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new indptr, element positions) of CSR rows `rows`, in that order, without a Python loop."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    new_indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    positions = np.repeat(starts - new_indptr[:-1], lengths) + np.arange(new_indptr[-1], dtype=np.int64)
    return new_indptr, positions


def dense_to_csr(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(block)
    indptr = np.zeros(block.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=block.shape[0]), out=indptr[1:])
    return indptr, cols, block[rows, cols]


def remap_columns(indptr, indices, data, mapping: np.ndarray, n_cols: int):
    """Move CSR columns through `mapping` (-1 drops), then sort each row, sum duplicates, drop explicit zeros."""
    n_rows = len(indptr) - 1
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    cols = mapping[indices] if mapping is not None else indices.astype(np.int64)
    keep = (cols >= 0) & (data != 0)
    rows, cols, data = rows[keep], cols[keep], data[keep]
    keys = rows * n_cols + cols
    if len(keys) > 1 and not np.all(keys[1:] > keys[:-1]):
        order = np.argsort(keys, kind="stable")
        keys, rows, cols, data = keys[order], rows[order], cols[order], data[order]
        first = np.concatenate(([True], keys[1:] != keys[:-1]))
        if not first.all():
            data = np.add.reduceat(data, np.flatnonzero(first))
            rows, cols = rows[first], cols[first]
    new_indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=new_indptr[1:])
    return new_indptr, cols, data
