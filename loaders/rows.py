"""A source's rows, read in order, checked and moved onto a target gene space: what conversion writes into a store
and what `cellssl.embed` encodes straight from an AnnData.

The value kind is decided from the first chunk (integers: counts; values whose expm1 rows sum to one constant S:
log1p of counts per S, rescaled to per 10,000 when S is another constant) and then held by every row: a later row
that disagrees (raw counts after log1p rows, a row whose expm1 sums to another total) stops the reading and names
the row. Every value must be finite and ≥ 0, counts integral. Never imports engine or kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .csr import remap_columns
from .errors import InputError
from .genes import GeneAlignment
from .sources import RowChunk, Source
from .store import TARGET_SUM

MAX_EXACT_COUNT = 1 << 24    # float32 holds every integer up to here exactly
ROW_SUM_TOLERANCE = 0.01     # a log1p row's expm1 sum may differ from the total by this fraction (float32 rounding)


@dataclass(frozen=True)
class ValueKind:
    """"counts" or "log1p_10k"; `scale`: the total the source's log1p values are per (10,000 unless rescaled);
    `checked`: whether every row is held to it (not when the user or the format declared it)."""

    kind: str
    scale: float = TARGET_SUM
    checked: bool = True


def _expm1_row_sums(chunk: RowChunk) -> tuple[np.ndarray, np.ndarray]:
    """(rows with values, the expm1 sum of each)."""
    data = np.asarray(chunk.data)
    filled = np.flatnonzero(np.diff(chunk.indptr) > 0)
    if not len(data):
        return filled, np.zeros(0)
    return filled, np.add.reduceat(np.expm1(data.astype(np.float64)), chunk.indptr[:-1][filled])


def decide_value_kind(requested: str | None, source: Source, first: RowChunk) -> ValueKind:
    """The kind the user asked for, else the format's, else the one the first chunk shows."""
    declared = requested or source.value_kind
    if declared is not None:
        return ValueKind(declared, TARGET_SUM, checked=False)
    data = np.asarray(first.data)
    if np.all(np.mod(data, 1) == 0):
        return ValueKind("counts")
    _, sums = _expm1_row_sums(first)
    scale = float(np.median(sums)) if len(sums) else 0.0
    if len(sums) and scale > 0 and np.all(np.abs(sums - scale) < ROW_SUM_TOLERANCE * scale):
        return ValueKind("log1p_10k", TARGET_SUM if abs(scale - TARGET_SUM) < 100 else round(scale, 6))
    raise InputError(f"{source.describe()}", f"values are not integer counts and not log1p of counts per a constant "
                     f"total (row sums of expm1 from {sums.min() if len(sums) else 0:.4g} to "
                     f"{sums.max() if len(sums) else 0:.4g})", "supply raw counts (a counts layer or raw/X: --layer "
                     "counts|raw), or pass --value-kind log1p_10k to store these values as they are")


def rescale_log1p(data: np.ndarray, scale: float) -> np.ndarray:
    """log1p(x per `scale`) → log1p(x per 10,000)."""
    return np.log1p(np.expm1(data.astype(np.float64)) * (TARGET_SUM / scale)).astype(np.float32)


class SourceRows:
    """Rows of `source` aligned to `alignment.target`, chunk by chunk, in source order. `kind`: the value kind
    (decided from the first chunk read when None); `max_value`: the largest value seen (the store's count dtype)."""

    def __init__(self, source: Source, alignment: GeneAlignment, kind: ValueKind | None = None,
                 requested_kind: str | None = None):
        self.source, self.alignment, self.kind, self.requested = source, alignment, kind, requested_kind
        self.max_value = 0.0

    def chunks(self, scratch: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[RowChunk, tuple]]:
        """(source chunk, (indptr, gene columns, float32 values) on the target genes) for rows [start, stop)."""
        stop = self.source.n_cells if stop is None else stop
        n_genes = len(self.alignment.target)
        mapping = None if self.alignment.is_identity else self.alignment.source_to_target
        seen = start
        for chunk in self.source.chunks_in(scratch, start, stop):
            if chunk.start != seen or chunk.start + len(chunk) > stop:
                raise InputError(self.source.describe(), f"rows out of order or beyond the declared "
                                 f"{self.source.n_cells} cells", "the source file is inconsistent; re-export it")
            self._check_structure(chunk)
            self._check_values(chunk)
            if self.kind is None:
                self.kind = decide_value_kind(self.requested, self.source, chunk)
            self._check_kind(chunk)
            data = np.asarray(chunk.data)
            if self.kind.scale != TARGET_SUM:
                data = rescale_log1p(data, self.kind.scale)
            indptr, cols, vals = remap_columns(chunk.indptr, np.asarray(chunk.indices), data, mapping, n_genes)
            seen += len(chunk)
            yield chunk, (indptr, cols, vals.astype(np.float32, copy=False))
        if seen != stop:
            raise InputError(self.source.describe(), f"yielded {seen - start} of rows [{start}, {stop}); its header "
                             f"declares {self.source.n_cells} cells", "the source is truncated or inconsistent; "
                             "re-export it")

    def _fail(self, chunk: RowChunk, pos: int, problem: str, fix: str):
        row = int(np.searchsorted(chunk.indptr, pos, side="right") - 1)
        gene = self.source.genes.gene_id[int(chunk.indices[pos])]
        raise InputError(self.source.describe(), f"{problem} at cell {chunk.start + row} (source order), gene {gene}",
                         fix)

    def _check_structure(self, chunk: RowChunk) -> None:
        """The CSR as stated: offsets from 0 rising to the number of values, gene columns in range, no gene twice in
        a row. A malformed matrix is refused, never repaired (dropping or summing entries would change the data)."""
        indptr, indices, n_genes = chunk.indptr, np.asarray(chunk.indices), len(self.source.genes)
        fix = "re-export the matrix with anndata (adata.X.check_format(), sum_duplicates()) or from its source"
        if indptr[0] != 0 or indptr[-1] != len(indices) or len(np.asarray(chunk.data)) != len(indices) or \
                np.any(np.diff(indptr) < 0):
            raise InputError(self.source.describe(), f"malformed rows {chunk.start}–{chunk.start + len(chunk) - 1} "
                             "(source order): row offsets (indptr) do not rise from 0 to the number of values", fix)
        if not len(indices):
            return
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= n_genes:
            pos = int(np.argmax((indices < 0) | (indices >= n_genes)))
            raise InputError(self.source.describe(), f"gene column {int(indices[pos])} outside [0, {n_genes}) at cell "
                             f"{chunk.start + int(np.searchsorted(indptr, pos, side='right') - 1)} (source order)", fix)
        rows = np.repeat(np.arange(len(chunk), dtype=np.int64), np.diff(indptr))
        keys = rows * n_genes + indices
        if not np.all(keys[1:] > keys[:-1]):  # unsorted rows are fine; a gene twice in one row is not
            ordered = np.sort(keys)
            twice = np.flatnonzero(ordered[1:] == ordered[:-1])
            if len(twice):
                row, gene = divmod(int(ordered[twice[0]]), n_genes)
                raise InputError(self.source.describe(), f"cell {chunk.start + row} (source order) lists gene "
                                 f"{self.source.genes.gene_id[gene]} more than once (duplicate entries)", fix)

    def _check_values(self, chunk: RowChunk) -> None:
        data = np.asarray(chunk.data)
        if not len(data):
            return
        bad = ~np.isfinite(data) | (data < 0)
        if bad.any():
            pos = int(np.argmax(bad))
            self._fail(chunk, pos, f"non-finite or negative value {float(data[pos])!r}",
                       "clean the matrix (NaN/Inf/negative values have no meaning as expression)")
        self.max_value = max(self.max_value, float(data.max()))

    def _check_kind(self, chunk: RowChunk) -> None:
        data = np.asarray(chunk.data)
        if not len(data):
            return
        if self.kind.kind == "counts":
            fractional = np.mod(data, 1) != 0
            if fractional.any():
                pos = int(np.argmax(fractional))
                self._fail(chunk, pos, f"non-integer value in a counts matrix ({float(data[pos])!r})", "pass --value-kind "
                           "log1p_10k if the values are log1p of counts per 10,000, or supply raw counts with --layer")
            if self.max_value >= MAX_EXACT_COUNT:
                raise InputError(self.source.describe(), f"count {self.max_value:.0f} exceeds {MAX_EXACT_COUNT}",
                                 "check the matrix: no single gene has that many UMIs in one cell")
        elif self.kind.checked:
            filled, sums = _expm1_row_sums(chunk)
            off = np.abs(sums - self.kind.scale) >= ROW_SUM_TOLERANCE * self.kind.scale
            if off.any():
                row = int(filled[np.argmax(off)])
                raise InputError(self.source.describe(), f"cell {chunk.start + row} (source order) is not log1p of "
                                 f"counts per {self.kind.scale:,.6g} like the rows before it (its expm1 sums to "
                                 f"{sums[np.argmax(off)]:,.6g}): the matrix mixes kinds of values",
                                 "supply one kind for every cell: raw counts (--layer counts|raw), or one "
                                 "normalisation; --value-kind log1p_10k stores the values as they are")
