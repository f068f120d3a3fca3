"""CSR rows → dense float32 rows, and the per-cell normalisation the store's counts need.

`scatter_rows` zeroes and fills each output row in one pass (numba, parallel over rows, GIL released): the
row is hot in cache when its values land, which is about twice as fast as zeroing the whole buffer first.
`log1p_per_10k` turns counts into scTab's values with the same float32 operations as
`np.log1p(dense / dense.sum(1, keepdims=True) * np.float32(1e4))`, so the results are bitwise equal.
Never imports engine or kernels.
"""
from __future__ import annotations

import numba
import numpy as np

TARGET_SUM = np.float32(1e4)


@numba.njit(parallel=True, nogil=True, cache=True)
def scatter_rows(out, positions, indptr, indices, values):
    """out[r] = dense row `positions[r]` of the CSR (indptr, indices, values), for r < len(positions)."""
    for r in numba.prange(positions.shape[0]):
        row = out[r]
        row[:] = 0.0
        p = positions[r]
        for j in range(indptr[p], indptr[p + 1]):
            row[indices[j]] = values[j]


@numba.njit(parallel=True, nogil=True, cache=True)
def _per_10k(indptr, values, out):
    for r in numba.prange(indptr.shape[0] - 1):
        total = 0.0
        for j in range(indptr[r], indptr[r + 1]):
            total += values[j]
        row_sum = np.float32(total)  # exact: integer counts summing below 2^24
        for j in range(indptr[r], indptr[r + 1]):
            out[j] = np.float32(values[j]) / row_sum * TARGET_SUM


def log1p_per_10k(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float32 log1p(value / row sum · 10,000) per stored value. The quotient is formed with the same two
    float32 roundings as the dense formula and the log1p is numpy's own, so the result equals
    `np.log1p(dense / dense.sum(1, keepdims=True) * np.float32(1e4))` bit for bit."""
    out = np.empty(len(values), np.float32)
    _per_10k(indptr, values, out)
    return np.log1p(out, out=out)
