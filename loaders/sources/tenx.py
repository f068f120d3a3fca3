"""Reader of a Cell Ranger matrix folder: `matrix.mtx(.gz)` (genes x cells, Matrix Market coordinates),
`features.tsv(.gz)` (or the older `genes.tsv`) and `barcodes.tsv(.gz)`. Only "Gene Expression" features are
kept. The coordinates are read in blocks and transposed to cell rows in bounded memory.
Never imports engine or kernels.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..errors import InputError
from ..genes import GeneSpace
from .base import RowChunk, Source, rows_from_triplets, source_dir

ENTRIES_PER_BLOCK = 1 << 23


def _find(folder: Path, *names: str) -> Path:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise InputError(folder, f"no {' or '.join(names)}(.gz)", "pass a Cell Ranger filtered_feature_bc_matrix folder")


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path, "rt")


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(path, f"unreadable ({exc})", "re-export the folder from Cell Ranger") from exc


class TenxSource(Source):
    def __init__(self, path: str | Path):
        path = source_dir(path, "pass a Cell Ranger filtered_feature_bc_matrix folder")
        self.matrix = _find(path, "matrix.mtx")
        features = _read_tsv(_find(path, "features.tsv", "genes.tsv"))
        barcodes = _read_tsv(_find(path, "barcodes.tsv"))
        self.n_features, n_cells, self.nnz, self.field = self._header()
        if len(features) != self.n_features or len(barcodes) != n_cells:
            raise InputError(self.matrix, f"header says {self.n_features} features x {n_cells} barcodes, the tsv "
                             f"files list {len(features)} and {len(barcodes)}", "use files from the same run")
        is_gene = (features[2] == "Gene Expression").to_numpy() if features.shape[1] > 2 else np.ones(len(features), bool)
        genes = features[is_gene]
        self.feature_to_gene = np.full(self.n_features, -1, np.int64)
        self.feature_to_gene[is_gene] = np.arange(is_gene.sum())
        names = genes[1] if genes.shape[1] > 1 else genes[0]
        duplicated = barcodes[0][barcodes[0].duplicated()]
        if len(duplicated):
            raise InputError(_find(path, "barcodes.tsv"), f"{len(duplicated)} barcode(s) appear more than once "
                             f"(first: {duplicated.iloc[0]!r}): cells would be indistinguishable",
                             "re-export the folder from Cell Ranger, or combine samples with distinct barcode suffixes")
        self.obs_arrays = {}
        super().__init__(path, GeneSpace.from_lists(genes[0], names), n_cells, None,
                         cell_names=barcodes[0].to_numpy(dtype=object))

    def _header(self) -> tuple[int, int, int, str]:
        try:
            with _open_text(self.matrix) as fh:
                banner = fh.readline().split()
                line = fh.readline()
                while line.startswith("%"):
                    line = fh.readline()
                dims = [int(v) for v in line.split()]
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(self.matrix, f"unreadable Matrix Market header ({exc})", "re-export the matrix") from exc
        if banner[:3] != ["%%MatrixMarket", "matrix", "coordinate"] or len(dims) != 3:
            raise InputError(self.matrix, "not a Matrix Market coordinate file", "re-export the matrix")
        return dims[0], dims[1], dims[2], banner[3]

    def describe(self) -> str:
        return f"10x:{self.path.name}"

    def chunks(self, scratch: Path) -> Iterator[RowChunk]:
        yield from rows_from_triplets(self._triplets(), self.n_cells, scratch,
                                      rows_per_block=max(1024, self.n_cells // 64), obs=self.obs_arrays,
                                      data_dtype=np.float64)

    def _triplets(self):
        seen = 0
        with _open_text(self.matrix) as fh:
            line = fh.readline()
            while line.startswith("%"):
                line = fh.readline()
            try:
                reader = pd.read_csv(fh, sep=" ", header=None, dtype={0: np.int64, 1: np.int64, 2: np.float64},
                                     chunksize=ENTRIES_PER_BLOCK, engine="c")
                for block in reader:
                    genes, cells, vals = (block[i].to_numpy() for i in range(3))
                    if genes.min() < 1 or genes.max() > self.n_features or cells.min() < 1 or cells.max() > self.n_cells:
                        raise InputError(self.matrix, f"an entry near entry {seen} lies outside the "
                                         f"{self.n_features} x {self.n_cells} header", "re-export the matrix")
                    seen += len(block)
                    cols = self.feature_to_gene[genes - 1]
                    keep = cols >= 0
                    yield cells[keep] - 1, cols[keep], vals[keep]
            except InputError:
                raise
            except (ValueError, EOFError, OSError) as exc:
                raise InputError(self.matrix, f"malformed entries near entry {seen} ({exc})",
                                 "re-export the matrix") from exc
        if seen != self.nnz:
            raise InputError(self.matrix, f"holds {seen} entries, the header promises {self.nnz} (truncated?)",
                             "re-export or re-download the matrix")
