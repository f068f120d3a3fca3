"""Reader of the published scTab directory (merlin/NVTabular parquet, `merlin_cxg_2023_05_15_sf-log1p`):
`{train,val,test}/part.N.parquet` with a dense list column `X` (log1p of counts per 10,000) and int64 code
columns, `var.parquet` (feature_id, feature_name) and `categorical_lookup/<column>.parquet` (a `label` column).
Dense rows are sparsified on the way. Never imports engine or kernels.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..csr import dense_to_csr
from ..errors import InputError
from ..genes import GeneSpace
from ..store import SPLITS
from .base import RowChunk, Source, source_dir

ROWS_PER_BATCH = 2048  # a dense 19,331-gene batch is 158 MB: bounded whatever the row-group size


def _part_number(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _read_parquet(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(path, f"missing ({what})", "point at the scTab directory itself "
                         "(the one holding train/, val/, test/, var.parquet and categorical_lookup/)")
    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise InputError(path, f"not a readable parquet file ({exc})", "re-download the file") from exc


CHILD_MATRIX = Path("cell_type_hierarchy") / "child_matrix.npy"


def read_child_matrix(file: Path, n: int, fix: str = "use the child matrix of the same scTab release") -> list[list[int]]:
    """A cell-type child matrix (.npy, n × n zeros and ones: row i marks the direct and indirect children of type i,
    as scTab's cell_type_hierarchy/child_matrix.npy) as each type's list of children."""
    try:
        matrix = np.load(file, allow_pickle=False)
    except Exception as exc:
        raise InputError(file, f"not a readable .npy array ({exc})", fix) from exc
    if matrix.shape != (n, n) or not np.isin(matrix, (0, 1)).all():
        raise InputError(file, f"a {matrix.shape} array of {matrix.dtype}; expected {n} × {n} zeros and ones, one row "
                         "and column per cell type", fix)
    return [np.flatnonzero(row).tolist() for row in matrix]


def _hierarchy(path: Path, categories: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """scTab's cell-type hierarchy, where the directory has it (in the codes of categorical_lookup/cell_type)."""
    file = path / CHILD_MATRIX
    if not file.is_file() or "cell_type" not in categories:
        return {}
    return {"cell_type": read_child_matrix(file, len(categories["cell_type"]), "use the child matrix of the same "
                                           "scTab release, or remove it to convert without the hierarchy")}


class ScTabSource(Source):
    def __init__(self, path: str | Path):
        path = source_dir(path, "pass the scTab directory (merlin_cxg_2023_05_15_sf-log1p)")
        var = _read_parquet(path / "var.parquet", "gene table")
        for col in ("feature_id", "feature_name"):
            if col not in var:
                raise InputError(path / "var.parquet", f"no column {col!r}", "use the published scTab var.parquet")
        self.parts = {s: sorted((path / s).glob("*.parquet"), key=_part_number) for s in SPLITS}
        files = [f for s in SPLITS for f in self.parts[s]]
        if not files:
            raise InputError(path, "no train/, val/ or test/ part files", "point at the scTab directory itself")
        try:
            metadata = [pq.ParquetFile(f).metadata for f in files]
            self.counts = [m.num_rows for m in metadata]
            # the unit of parallel work: every row group of every part file, in order (a source of few large files
            # still splits evenly over the workers)
            self.groups = [(f, g, m.row_group(g).num_rows) for f, m in zip(files, metadata)
                           for g in range(m.num_row_groups)]
            schema = pq.read_schema(files[0])
        except Exception as exc:
            raise InputError(files[0], f"not a readable parquet file ({exc})", "re-download the file") from exc
        if "X" not in schema.names:
            raise InputError(files[0], "no column 'X'", "use the published scTab parquet files")
        self.code_columns = [n for n in schema.names if n != "X"]
        categories, numeric = {}, {}
        for name in self.code_columns:
            lookup = path / "categorical_lookup" / f"{name}.parquet"
            if lookup.exists():
                table = _read_parquet(lookup, f"labels of {name}")
                if "label" not in table:
                    raise InputError(lookup, "no column 'label'", "use the published scTab lookup files")
                categories[name] = [str(v) for v in table["label"]]
            else:
                numeric[name] = np.dtype(np.int64)
        natural = np.concatenate([np.full(sum(pq.ParquetFile(f).metadata.num_rows for f in self.parts[s]), s,
                                          dtype=object) for s in SPLITS])
        genes = GeneSpace.from_lists(var["feature_id"], var["feature_name"])
        super().__init__(path, genes, int(sum(self.counts)), "log1p_10k", categories, numeric, natural)
        self.hierarchy = _hierarchy(path, categories)

    def describe(self) -> str:
        return f"sctab:{self.path.name}"

    def chunks(self, scratch: Path) -> Iterator[RowChunk]:
        yield from self.chunks_in(scratch, 0, self.n_cells)

    def partitions(self, n: int) -> list[tuple[int, int]]:
        """Runs of whole row groups with about the same number of rows each."""
        ends = np.cumsum([rows for _, _, rows in self.groups])
        cuts = sorted({int(ends[np.searchsorted(ends, self.n_cells * k / n, side="left")]) for k in range(1, n)})
        bounds = [0] + [c for c in cuts if 0 < c < self.n_cells] + [self.n_cells]
        return list(zip(bounds[:-1], bounds[1:]))

    def chunks_in(self, scratch: Path, start: int, stop: int) -> Iterator[RowChunk]:
        # mimalloc keeps freed row groups (316 MB per 4,096 dense rows) mapped; the system pool returns them.
        previous = pa.default_memory_pool()
        pa.set_memory_pool(pa.system_memory_pool())
        try:
            yield from self._chunks(start, stop)
        finally:
            pa.set_memory_pool(previous)

    def _row_groups(self, first: int, stop: int) -> Iterator[tuple[Path, list[int]]]:
        """(file, its row groups) covering rows [first, stop), which must start and end at row-group boundaries."""
        offsets = np.concatenate(([0], np.cumsum([rows for _, _, rows in self.groups])))
        if first not in offsets or stop not in offsets:
            raise ValueError(f"rows [{first}, {stop}) do not start and end at row-group boundaries")
        chosen = self.groups[int(np.searchsorted(offsets, first)):int(np.searchsorted(offsets, stop))]
        for f in dict.fromkeys(f for f, _, _ in chosen):
            yield f, [g for file, g, _ in chosen if file == f]

    def _chunks(self, first: int, stop: int) -> Iterator[RowChunk]:
        start = first
        for f, groups in self._row_groups(first, stop):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BATCH, row_groups=groups):
                block = self._dense(batch, f)
                indptr, indices, data = dense_to_csr(block)
                obs = {}
                for name in self.code_columns:
                    codes = batch.column(name).to_numpy(zero_copy_only=False)
                    if name in self.categories:
                        if len(codes) and (codes.min() < 0 or codes.max() >= len(self.categories[name])):
                            raise InputError(f"{f}:{name}", f"code {codes.max()} has no label in "
                                             f"categorical_lookup/{name}.parquet", "use the matching lookup files")
                        codes = codes.astype(np.int32)
                    obs[name] = codes
                yield RowChunk(start, indptr, indices, data, obs)
                start += len(block)

    def _dense(self, batch: pa.RecordBatch, f: Path) -> np.ndarray:
        col = batch.column("X")
        n_genes = len(self.genes)
        if pa.types.is_fixed_size_list(col.type):
            values = col.values
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lengths = np.diff(col.offsets.to_numpy())
            if np.any(lengths != n_genes):
                bad = int(np.argmax(lengths != n_genes))
                raise InputError(f"{f}:X", f"row {bad} of a batch holds {lengths[bad]} values; var.parquet lists "
                                 f"{n_genes} genes", "use the var.parquet of the same scTab release")
            values = col.flatten()
        else:
            raise InputError(f"{f}:X", f"type {col.type}, expected a list of float32", "use the published files")
        flat = values.to_numpy(zero_copy_only=False)
        if flat.size != len(batch) * n_genes:
            raise InputError(f"{f}:X", f"rows hold {flat.size // max(len(batch), 1)} values; var.parquet lists "
                             f"{n_genes} genes", "use the var.parquet of the same scTab release")
        return flat.reshape(len(batch), n_genes)
