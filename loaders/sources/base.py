"""What every source format hands the converter: gene space, obs description, and rows in source order.

A source yields `RowChunk`s of consecutive source rows as CSR in the source's own gene columns. Formats whose
matrix is not row-major (CSC h5ad, Matrix Market) go through `rows_from_triplets`, which transposes through a
scratch `Spill` in bounded memory. Never imports engine or kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..errors import InputError
from ..genes import GeneSpace
from ..spill import Spill


@dataclass
class RowChunk:
    start: int                      # source position of the first row
    indptr: np.ndarray              # int64, rebased to 0
    indices: np.ndarray             # source gene columns
    data: np.ndarray                # values as read
    obs: dict[str, np.ndarray]      # per row: int32 category codes (-1 missing) or numeric values

    def __len__(self) -> int:
        return len(self.indptr) - 1


@dataclass
class Source:
    """Base of the format readers. Subclasses set the fields in __init__ and implement `chunks`."""

    path: Path
    genes: GeneSpace
    n_cells: int
    value_kind: str | None                       # None: decide from the values (counts if integral)
    categories: dict[str, list[str]] = field(default_factory=dict)
    numeric: dict[str, np.dtype] = field(default_factory=dict)
    natural_splits: np.ndarray | None = None     # per cell "train"/"val"/"test", when the format has them
    cell_names: np.ndarray | None = None         # per cell its name in the source (obs_names, barcodes), as str
    hierarchy: dict[str, list[list[int]]] = field(default_factory=dict)  # column → children of each code

    def chunks(self, scratch: Path) -> Iterator[RowChunk]:
        """Rows in source order; `scratch` is a private folder for formats that must transpose."""
        raise NotImplementedError

    def spec(self) -> tuple[type, tuple, dict]:
        """(class, args, kwargs) that open this source again in another process."""
        return type(self), (self.path,), {}

    def columns(self) -> list[str]:
        """The obs columns `column` can read (what --split-by may name)."""
        return []

    def column(self, name: str) -> np.ndarray:
        """One obs column for the whole source, as labels (used by --split-by)."""
        raise InputError(self.path, f"this format has no obs column {name!r} to split by",
                         "split with --val-frac/--test-frac instead")

    def describe(self) -> str:
        return f"{type(self).__name__.removesuffix('Source').lower()}:{self.path.name}"

    def partitions(self, n: int) -> list[tuple[int, int]]:
        """Up to `n` consecutive row ranges [start, stop) that `chunks_in` can read independently (in parallel
        processes); one range where the format cannot be split."""
        return [(0, self.n_cells)]

    def chunks_in(self, scratch: Path, start: int, stop: int) -> Iterator[RowChunk]:
        """The chunks of rows [start, stop), a range `partitions` returned."""
        if (start, stop) != (0, self.n_cells):
            raise ValueError(f"{type(self).__name__} reads only whole: rows [0, {self.n_cells})")
        yield from self.chunks(scratch)

    def report(self) -> str:
        """What the conversion kept beside the matrix and obs (paired modalities), for its log line."""
        return ""


def source_dir(path: str | Path, fix: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "not a directory", fix)
    return path


def obs_from_frame(frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, np.dtype]]:
    """Split a pandas obs table into per-row arrays, categories of the categorical/text columns, numeric dtypes."""
    arrays, categories, numeric = {}, {}, {}
    for name in frame.columns:
        col = frame[name]
        if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or pd.api.types.is_string_dtype(col):
            cat = pd.Categorical(col.astype(object).where(col.notna(), None))
            categories[str(name)] = [str(c) for c in cat.categories]
            arrays[str(name)] = cat.codes.astype(np.int32)
        elif pd.api.types.is_bool_dtype(col):
            arrays[str(name)], numeric[str(name)] = col.to_numpy(np.uint8), np.dtype(np.uint8)
        elif pd.api.types.is_integer_dtype(col):
            arrays[str(name)], numeric[str(name)] = col.to_numpy(np.int64), np.dtype(np.int64)
        elif pd.api.types.is_numeric_dtype(col):
            arrays[str(name)], numeric[str(name)] = col.to_numpy(np.float64), np.dtype(np.float64)
    return arrays, categories, numeric


def rows_from_triplets(triplets: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], n_rows: int, scratch: Path,
                       rows_per_block: int, obs: dict[str, np.ndarray], data_dtype) -> Iterator[RowChunk]:
    """Turn (row, col, value) triplets in any order into row chunks in row order, via per-block scratch files."""
    spill = Spill(scratch, np.int64, {"col": np.int64, "val": np.dtype(data_dtype)})
    for rows, cols, vals in triplets:
        block = rows // rows_per_block
        order = np.argsort(block, kind="stable")
        spill.append_split(block[order], rows[order], np.arange(len(rows) + 1), {"col": cols[order],
                                                                                  "val": vals[order]})
    for b, start in enumerate(range(0, n_rows, rows_per_block)):
        stop = min(start + rows_per_block, n_rows)
        rows, elems = spill.pop(b)
        order = np.argsort(rows - start, kind="stable")
        counts = np.bincount(rows - start, minlength=stop - start)
        indptr = np.zeros(stop - start + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        yield RowChunk(start, indptr, elems["col"][order], elems["val"][order], slice_obs(obs, start, stop))


def slice_obs(obs: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in obs.items()}
