"""AnnData .h5ad reader for conversion: CSR, CSC or dense X (or a counts layer, or raw), read in row blocks
straight from HDF5 so the matrix is never whole in memory. Never imports engine or kernels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd
from anndata.io import read_elem

from ..csr import dense_to_csr
from ..errors import InputError
from ..genes import GeneSpace
from .base import RowChunk, Source, obs_from_frame, rows_from_triplets, slice_obs

ELEMENTS_PER_CHUNK = 1 << 24  # nonzeros (or dense values) read per block: ~100-200 MB in flight


def open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise InputError(path, "file not found", "check the path")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5/h5ad file ({exc})",
                         "pass an .h5ad written by anndata; re-download it if it is truncated") from exc


def _choose_matrix(f: h5py.File, layer: str, path: Path) -> tuple[str, str]:
    """(matrix element, var element) for --layer: auto, X, counts (layers/counts), raw (raw/X) or a layer name."""
    if layer == "auto":
        layer = "counts" if "layers/counts" in f else ("raw" if "raw/X" in f else "X")
    element = {"X": "X", "raw": "raw/X"}.get(layer, f"layers/{layer}")
    if element not in f:
        have = ["X"] + (["raw"] if "raw/X" in f else []) + list(f["layers"].keys() if "layers" in f else [])
        raise InputError(path, f"no matrix {element!r}", f"choose --layer from {have}")
    return element, "raw/var" if element == "raw/X" else "var"


class H5adSource(Source):
    def __init__(self, path: str | Path, layer: str = "auto", value_kind: str | None = None):
        path = Path(path)
        self.file, self.layer = open_h5(path), layer
        self.element, var_element = _choose_matrix(self.file, layer, path)
        try:
            var = read_elem(self.file[var_element])
            obs = read_elem(self.file["obs"])
        except Exception as exc:
            raise InputError(path, f"obs/var cannot be read ({exc})", "rewrite the file with a current anndata") from exc
        self.x = self.file[self.element]
        self.encoding = self._encoding(path)
        n_cells, n_genes = self._shape()
        if (len(obs), len(var)) != (n_cells, n_genes):
            raise InputError(f"{path}:{self.element}", f"shape {n_cells} x {n_genes} disagrees with obs ({len(obs)}) "
                             f"and var ({len(var)})", "rewrite the file with anndata")
        obs = obs.copy()
        names = obs.index.astype(str).to_numpy(dtype=object)
        self.paired = self._paired_modalities(n_cells)
        for key, frame in self.paired.items():
            obs = pd.concat([obs, frame.set_axis(obs.index)], axis=1)
        self.obs_arrays, categories, numeric = obs_from_frame(obs)
        self._labels = obs
        super().__init__(path, GeneSpace.from_frame(var, f"{path}:{var_element}"), n_cells, value_kind,
                         categories, numeric, cell_names=names)

    def _paired_modalities(self, n_cells: int) -> dict[str, pd.DataFrame]:
        """obsm matrices of paired measurements (e.g. obsm["protein"]), as float32 columns KEY_NAME; embeddings
        (X_pca, X_umap, …) are not measurements and stay behind. Names come from a DataFrame's columns, else
        uns["KEY_names"], else KEY_0, KEY_1, …"""
        self.notes: list[str] = []  # what was left out or is incomplete, for the conversion's report
        if "obsm" not in self.file:
            return {}
        kept = {}
        for key in self.file["obsm"]:
            if key.startswith("X_"):
                continue
            try:
                value = read_elem(self.file["obsm"][key])
            except Exception as exc:
                raise InputError(f"{self.path}:obsm/{key}", f"cannot be read ({exc})", "rewrite the file with a "
                                 "current anndata") from exc
            frame = value if isinstance(value, pd.DataFrame) else pd.DataFrame(np.asarray(value))
            if frame.ndim != 2 or len(frame) != n_cells or not all(map(pd.api.types.is_numeric_dtype, frame.dtypes)):
                self.notes.append(f"left out obsm['{key}'] ({len(frame)} rows for {n_cells} cells)" if
                                  len(frame) != n_cells else f"left out obsm['{key}'] (not numeric)")
                continue
            bad = int((~np.isfinite(frame.to_numpy(np.float64))).sum())
            if bad:
                self.notes.append(f"obsm['{key}'] holds {bad} NaN/infinite values, kept as they are (cross-modality "
                                  "evaluation refuses cells with them)")
            names = list(map(str, frame.columns))
            if not isinstance(value, pd.DataFrame) and f"uns/{key}_names" in self.file:
                listed = [v.decode() if isinstance(v, bytes) else str(v) for v in self.file[f"uns/{key}_names"][()]]
                names = listed if len(listed) == frame.shape[1] else names
            names = [n if n.startswith(f"{key}_") else f"{key}_{n}" for n in names]
            kept[key] = pd.DataFrame(frame.to_numpy(np.float32), columns=names)
        return kept

    def report(self) -> str:
        return "; ".join([f"kept obsm['{k}'] ({f.shape[1]} columns) as obs columns {k}_*"
                          for k, f in self.paired.items()] + self.notes)

    def _encoding(self, path: Path) -> str:
        if isinstance(self.x, h5py.Dataset):
            return "dense"
        enc = self.x.attrs.get("encoding-type", self.x.attrs.get("h5sparse_format", ""))
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if enc.startswith("csr"):
            return "csr"
        if enc.startswith("csc"):
            return "csc"
        raise InputError(f"{path}:{self.element}", f"unknown matrix encoding {enc!r}", "store X as CSR, CSC or dense")

    def _shape(self) -> tuple[int, int]:
        if self.encoding == "dense":
            return tuple(int(s) for s in self.x.shape)
        return tuple(int(s) for s in self.x.attrs.get("shape", self.x.attrs.get("h5sparse_shape")))

    def columns(self) -> list[str]:
        return [str(c) for c in self._labels.columns]

    def column(self, name: str) -> np.ndarray:
        if name not in self._labels:
            raise InputError(f"{self.path}:obs", f"no column {name!r}", f"choose from {list(self._labels.columns)}")
        return self._labels[name].astype(str).to_numpy()

    def describe(self) -> str:
        return f"h5ad:{self.path.name}:{self.element}"

    def spec(self) -> tuple[type, tuple, dict]:
        return type(self), (self.path,), {"layer": self.layer, "value_kind": self.value_kind}

    def partitions(self, n: int) -> list[tuple[int, int]]:
        """Row ranges with about the same number of values each (CSR) or rows (dense), read independently; a CSC
        matrix is read whole (its rows are scattered over the file: one transposition)."""
        if self.encoding == "csc" or n <= 1 or self.n_cells < 2:
            return [(0, self.n_cells)]
        if self.encoding == "dense":
            cuts = np.linspace(0, self.n_cells, n + 1).round().astype(int)
        else:
            indptr = self.x["indptr"][:].astype(np.int64)
            cuts = np.searchsorted(indptr, np.linspace(0, indptr[-1], n + 1), side="left").clip(0, self.n_cells)
        bounds = sorted({0, self.n_cells, *map(int, cuts)})
        return list(zip(bounds[:-1], bounds[1:]))

    def chunks_in(self, scratch: Path, start: int, stop: int) -> Iterator[RowChunk]:
        if self.encoding == "csc":
            yield from super().chunks_in(scratch, start, stop)
        else:
            yield from self._rows(start, stop)

    def chunks(self, scratch: Path) -> Iterator[RowChunk]:
        if self.encoding == "csc":
            yield from rows_from_triplets(self._csc_triplets(), self.n_cells, scratch,
                                          rows_per_block=max(1024, self.n_cells // 64), obs=self.obs_arrays,
                                          data_dtype=self.x["data"].dtype)
        else:
            yield from self._rows(0, self.n_cells)

    def _rows(self, first: int, last: int) -> Iterator[RowChunk]:
        """Rows [first, last) of a dense or CSR matrix, in blocks of about ELEMENTS_PER_CHUNK stored values."""
        if self.encoding == "dense":
            step = max(1, ELEMENTS_PER_CHUNK // max(len(self.genes), 1))
            for start in range(first, last, step):
                stop = min(start + step, last)
                yield RowChunk(start, *dense_to_csr(self.x[start:stop]), slice_obs(self.obs_arrays, start, stop))
            return
        indptr = self.x["indptr"][first:last + 1].astype(np.int64)
        for a, b in _blocks(indptr, ELEMENTS_PER_CHUNK):
            lo, hi = indptr[a], indptr[b]
            yield RowChunk(first + a, indptr[a:b + 1] - lo, self.x["indices"][lo:hi], self.x["data"][lo:hi],
                           slice_obs(self.obs_arrays, first + a, first + b))

    def _csc_triplets(self):
        indptr = self.x["indptr"][:].astype(np.int64)
        for g0, g1 in _blocks(indptr, ELEMENTS_PER_CHUNK):
            lo, hi = indptr[g0], indptr[g1]
            genes = np.repeat(np.arange(g0, g1, dtype=np.int64), np.diff(indptr[g0:g1 + 1]))
            yield self.x["indices"][lo:hi].astype(np.int64), genes, self.x["data"][lo:hi]


def _blocks(indptr: np.ndarray, budget: int, max_rows: int = 65536):
    """Consecutive [start, stop) row ranges holding about `budget` nonzeros each (at least one row)."""
    n, start = len(indptr) - 1, 0
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + budget, side="right")) - 1
        stop = min(max(stop, start + 1), start + max_rows, n)
        yield start, stop
        start = stop


class AnnDataSource(Source):
    """An AnnData in memory (what a notebook holds), read in row blocks like an .h5ad: for `cellssl.embed`."""

    def __init__(self, adata, layer: str = "auto"):
        import scipy.sparse as sp

        if layer == "auto":
            layer = "counts" if "counts" in adata.layers else ("raw" if adata.raw is not None else "X")
        if layer == "raw" and adata.raw is None:
            raise InputError("AnnData", "has no .raw", "pass layer='X' or the name of a layer")
        if layer not in ("X", "raw") and layer not in adata.layers:
            raise InputError("AnnData", f"no layer {layer!r}", f"choose from {['X', 'raw', *adata.layers]}")
        self.x = adata.raw.X if layer == "raw" else adata.X if layer == "X" else adata.layers[layer]
        var = adata.raw.var if layer == "raw" else adata.var
        self.sparse, self.layer = sp.issparse(self.x), layer
        super().__init__(Path("AnnData"), GeneSpace.from_frame(var, f"AnnData.{'raw.' if layer == 'raw' else ''}var"),
                         adata.n_obs, None, cell_names=adata.obs_names.astype(str).to_numpy(dtype=object))

    def describe(self) -> str:
        return f"AnnData:{self.layer}"

    def chunks(self, scratch: Path) -> Iterator[RowChunk]:
        step = max(1, ELEMENTS_PER_CHUNK // max(len(self.genes), 1))
        for start in range(0, self.n_cells, step):
            block = self.x[start:start + step]
            if self.sparse:
                block = block.tocsr()
                block.sort_indices()
                yield RowChunk(start, block.indptr.astype(np.int64), block.indices, block.data, {})
            else:
                yield RowChunk(start, *dense_to_csr(np.asarray(block)), {})
