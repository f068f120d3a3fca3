"""CSR rows → a batch: normalise a decoded window's counts, gather rows, densify rows.

`log1p_per_10k` forms value / cell total · 10,000 with the same two float32 roundings as the dense formula and
finishes with numpy's own log1p, so a batch equals `np.log1p(dense / dense.sum(1, keepdims=True) *
np.float32(1e4))` bit for bit (integer row sums below 2^24 are exact in float32, whatever the summation order).
`scatter_rows` zeroes and fills each output row in one pass, while the row is hot in cache: about twice as fast
as zeroing the whole buffer first. `gather_rows` copies rows into one contiguous CSR (the csr output), one slice
per row. Both are single-threaded numba with the GIL released: the stream runs them beside its decode threads,
where numba's own thread pool competing with those was slower in A/B runs on 2 cores.
Never imports engine or kernels.
"""
from __future__ import annotations

import numba
import numpy as np

from .store import TARGET_SUM as _TOTAL

TARGET_SUM = np.float32(_TOTAL)  # as float32: the dense formula's rounding


@numba.njit(nogil=True, cache=True)
def _per_10k(indptr, values, out, first, last):
    for r in range(first, last):
        total = 0.0
        for j in range(indptr[r], indptr[r + 1]):
            total += values[j]
        row_sum = np.float32(total)
        for j in range(indptr[r], indptr[r + 1]):
            out[j] = np.float32(values[j]) / row_sum * TARGET_SUM


SMALL_COUNTS = 1024  # counts below this share one normalised value per cell (the usual count is 1–5)
ROWS_PER_PASS = 1024  # bounds the temporaries to ~1,024 cells' values


@numba.njit(nogil=True, cache=True)
def _distinct_per_10k(indptr, values, first, last, slot_of, distinct, seen):
    """For cells [first, last): distinct[k] = value / cell total · 10,000 of each distinct small count of a cell
    (and of every large one), slot_of[j] = its k for element j (numbered from indptr[first]). Returns how many."""
    n = 0
    base = indptr[first]
    for r in range(first, last):
        total = 0.0
        for j in range(indptr[r], indptr[r + 1]):
            total += values[j]
        row_sum = np.float32(total)
        start = n  # slots below it belong to earlier cells: `seen` never needs clearing
        for j in range(indptr[r], indptr[r + 1]):
            c = values[j]
            if c < SMALL_COUNTS and seen[c] >= start:
                slot_of[j - base] = seen[c]
                continue
            distinct[n] = np.float32(c) / row_sum * TARGET_SUM
            slot_of[j - base] = n
            if c < SMALL_COUNTS:
                seen[c] = n
            n += 1
    return n


@numba.njit(nogil=True, cache=True)
def _take(table, slot_of, out):
    for j in range(len(slot_of)):
        out[j] = table[slot_of[j]]


def log1p_per_10k(indptr: np.ndarray, values: np.ndarray, pool=None, parts: int = 2,
                  out: np.ndarray | None = None) -> np.ndarray:
    """float32 log1p(value / cell total · 10,000) for every stored value, split over `pool` by rows. Integer counts
    take numpy's log1p once per distinct count of a cell (a cell's ~2,000 values hold a few dozen distinct counts;
    log1p, not memory, was the loader's bound), then a gather: the same numbers, bit for bit, ~10x fewer log1p.
    Written into `out` (float32, as long as `values`) where given."""
    out = np.empty(len(values), np.float32) if out is None else out
    n = len(indptr) - 1
    cuts = [n * i // parts for i in range(parts + 1)]
    integral = values.dtype.kind in "ui"

    def part(i):
        if not integral:
            _per_10k(indptr, values, out, cuts[i], cuts[i + 1])
            lo, hi = indptr[cuts[i]], indptr[cuts[i + 1]]
            np.log1p(out[lo:hi], out=out[lo:hi])
            return
        seen = np.full(SMALL_COUNTS, -1, np.int64)
        for a in range(cuts[i], cuts[i + 1], ROWS_PER_PASS):
            b = min(a + ROWS_PER_PASS, cuts[i + 1])
            lo, hi = indptr[a], indptr[b]
            slot_of, distinct = np.empty(hi - lo, np.int32), np.empty(hi - lo, np.float32)
            seen[:] = -1
            k = _distinct_per_10k(indptr, values, a, b, slot_of, distinct, seen)
            _take(np.log1p(distinct[:k]), slot_of, out[lo:hi])

    list((pool.map if pool else map)(part, range(parts)))
    return out


def _split(rows: int, parts: int, pool, work) -> None:
    """work(first, last) over `parts` contiguous row ranges, on `pool` when there is one (the kernels release the
    GIL, so ranges run side by side)."""
    cuts = [rows * i // parts for i in range(parts + 1)]
    spans = [(cuts[i], cuts[i + 1]) for i in range(parts) if cuts[i] < cuts[i + 1]]
    list((pool.map if pool and len(spans) > 1 else map)(lambda span: work(*span), spans))


@numba.njit(nogil=True, cache=True)
def _row_offsets(positions, indptr, out_indptr):
    out_indptr[0] = 0
    for r in range(positions.shape[0]):
        out_indptr[r + 1] = out_indptr[r] + indptr[positions[r] + 1] - indptr[positions[r]]


@numba.njit(nogil=True, cache=True)
def _copy_rows(positions, indptr, indices, values, out_indptr, out_indices, out_values, first, last):
    for r in range(first, last):
        a, b, o = indptr[positions[r]], indptr[positions[r] + 1], out_indptr[r]
        out_indices[o:o + b - a] = indices[a:b]
        out_values[o:o + b - a] = values[a:b]


def gather_rows(positions, indptr, indices, values, out_indptr, out_indices, out_values, pool=None,
                parts: int = 1) -> None:
    """Rows `positions` of (indptr, indices, values) into the out_* buffers (values converted to out_values' dtype):
    offsets first, then one slice copy per row (no running counter, so each copy vectorises: ~2x the
    element-by-element loop), the rows split over `parts` threads of `pool`."""
    _row_offsets(positions, indptr, out_indptr)
    _split(len(positions), parts, pool, lambda a, b: _copy_rows(positions, indptr, indices, values, out_indptr,
                                                                out_indices, out_values, a, b))


@numba.njit(nogil=True, cache=True)
def _scatter(out, positions, indptr, indices, values, first, last):
    for r in range(first, last):
        row = out[r]
        row[:] = 0.0
        for j in range(indptr[positions[r]], indptr[positions[r] + 1]):
            row[indices[j]] = values[j]


def scatter_rows(out, positions, indptr, indices, values, pool=None, parts: int = 1) -> None:
    """out[r] = dense row `positions[r]` of the CSR (indptr, indices, values), for r < len(positions), the rows split
    over `parts` threads of `pool`."""
    _split(len(positions), parts, pool, lambda a, b: _scatter(out, positions, indptr, indices, values, a, b))
