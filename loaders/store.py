"""The cell store: a zarr v3 CSR matrix plus parquet obs/var, its writer and its validating reader.

The format (`FORMAT_VERSION`, 2: the obs.parquet checksum joined the attributes) is documented in loaders/README.md. The writer appends rows in store order and writes whole
shards only, so memory stays bounded and no shard is rewritten. The reader validates on open and checks every
range it decodes, so a corrupt or foreign store fails with one `CellStoreError`, never deep inside a batch.
Depends on numpy, pandas, pyarrow and zarr; never imports engine or kernels.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .errors import CellStoreError
from .genes import GeneSpace

FORMAT = "cellstore"
FORMAT_VERSION = 2  # 2: obs.parquet checksum in the attributes
VALUE_KINDS = ("counts", "log1p_10k")
TARGET_SUM = 10_000  # "log1p_10k": log1p of each cell's counts normalised to this total (scTab's values)
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
CATEGORIES_KEY = b"cellssl.categories"
HIERARCHY_KEY = b"cellssl.hierarchy"  # per categorical column, the children of each code (scTab's cell types)
MAX_METADATA_BYTES = 1 << 20  # a zarr.json cellssl writes is a few kB
MAX_INDPTR_RATIO = 8           # decoded ÷ stored bytes of X/indptr: real offsets compress about 3×
_DATA_DTYPES = {"float32", "uint16", "uint32"}
_INDEX_DTYPES = {"uint16", "int32"}


@dataclass(frozen=True)
class Layout:
    """Chunking and codec of X/indices and X/data (chosen by measurement: loaders/README.md)."""

    chunk: int = 1 << 18
    shard: int = 1 << 24
    indptr_chunk: int = 1 << 20
    codec: str = "auto"

    def compressors(self, dtype: np.dtype) -> list:
        # crc32c after compression: blosc has no checksum, and a flipped bit must fail loudly, not decode to junk.
        codec = self.codec
        if codec == "auto":  # measured: blosc-lz4 reads integers fastest; zstd1 shrinks log1p floats 4x more
            codec = "zstd1" if np.dtype(dtype).kind == "f" else "blosc-lz4"
        if codec == "blosc-lz4":
            return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize),
                    Crc32cCodec()]
        if codec.startswith("zstd") and (codec[4:] or "1").isdigit():
            return [ZstdCodec(level=int(codec[4:] or 1)), Crc32cCodec()]
        if codec == "none":
            return [Crc32cCodec()]
        raise CellStoreError("--codec", f"unknown codec {codec!r}", "use auto, blosc-lz4, zstdN (N = 1…22) or none")


def index_dtype(n_genes: int) -> np.dtype:
    return np.dtype(np.uint16) if n_genes <= 65535 else np.dtype(np.int32)


def index_fill_value(dtype: np.dtype) -> int:
    # A missing chunk reads as fill_value; an out-of-range fill turns silent zeros into a detected error.
    return 65535 if np.dtype(dtype) == np.uint16 else -1


class CellStoreWriter:
    """Writes a store of `n_cells` rows and `nnz` values at `path` (normally a temporary name; the caller renames it
    once verified). The arrays are created at their final sizes, so values can be written shard by shard by several
    processes (`write_values`), each shard by exactly one: the bytes do not depend on how many wrote them."""

    def __init__(self, path: str | Path, genes: GeneSpace, value_kind: str, data_dtype, obs_schema: pa.Schema,
                 categories: dict[str, list[str]], n_cells: int, nnz: int, layout: Layout = Layout(),
                 hierarchy: dict[str, list[list[int]]] | None = None):
        if value_kind not in VALUE_KINDS:
            raise ValueError(f"value_kind must be one of {VALUE_KINDS}, not {value_kind!r}")
        self.path, self.genes, self.value_kind, self.layout = Path(path), genes, value_kind, layout
        self.n_cells, self.nnz = n_cells, nnz
        self.group = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
        x = self.group.create_group("X")
        idx_dtype, data_dtype = index_dtype(len(genes)), np.dtype(data_dtype)

        def array(name, size, dtype, chunk, shard, fill):
            return x.create_array(name, shape=(size,), dtype=dtype, chunks=(chunk,), shards=shard and (shard,),
                                  compressors=layout.compressors(dtype), fill_value=fill)

        self.indptr = array("indptr", n_cells + 1, np.int64, layout.indptr_chunk, None, -1)
        array("indices", nnz, idx_dtype, layout.chunk, layout.shard, index_fill_value(idx_dtype))
        array("data", nnz, data_dtype, layout.chunk, layout.shard, 0)
        meta = {CATEGORIES_KEY: json.dumps(categories).encode()}
        if hierarchy:  # in the obs file's metadata: covered by its checksum like the categories
            meta[HIERARCHY_KEY] = json.dumps(hierarchy).encode()
        self.obs_schema = obs_schema.with_metadata(meta)
        self.obs_writer = pq.ParquetWriter(self.path / "obs.parquet", self.obs_schema, compression="zstd")
        genes.to_frame().to_parquet(self.path / "var.parquet", index=False)

    def write_obs(self, obs: pa.Table) -> None:
        """The next obs rows, in store order."""
        self.obs_writer.write_table(obs.cast(self.obs_schema))

    def write_offsets(self, indptr: np.ndarray) -> None:
        if indptr.shape != (self.n_cells + 1,) or indptr[-1] != self.nnz:
            raise ValueError(f"offsets of {len(indptr) - 1} rows ending at {indptr[-1]}; the store has {self.n_cells} "
                             f"rows and {self.nnz} values (internal error)")
        self.indptr[:] = indptr

    def finish(self, splits: dict[str, tuple[int, int]], shuffle_seed: int, source: str, extra: dict | None = None):
        self.obs_writer.close()
        self.group.attrs.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_cells": self.n_cells,
            "n_genes": len(self.genes),
            "nnz": self.nnz,
            "value_kind": self.value_kind,
            "splits": {k: [int(a), int(b)] for k, (a, b) in splits.items()},
            "shuffle_seed": shuffle_seed,
            "source": source,
            "var_checksum": self.genes.checksum(),
            "obs_checksum": file_checksum(self.path / "obs.parquet"),
            "layout": {"chunk": self.layout.chunk, "shard": self.layout.shard, "codec": self.layout.codec},
            **(extra or {}),
        })


def write_values(path: Path, start: int, indices: np.ndarray, data: np.ndarray) -> None:
    """Values [start, start + len(indices)) of the store being written at `path`, from any process. Whole shards only
    (`start` a multiple of the shard size, the end one too or the array's end), so that no shard has two writers."""
    for name, values in (("indices", indices), ("data", data)):
        array = zarr.open_array(str(Path(path) / "X" / name), mode="r+")
        array[start:start + len(values)] = values


def file_checksum(path: Path) -> str:
    """sha256 of a file's bytes (obs.parquet: any change to the cell table is detected on open)."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fail(path, problem, fix="reconvert the source with `cellssl convert`, or restore the store from a copy"):
    raise CellStoreError(path, problem, fix)


class CellStore:
    """A validated, read-only view of a cell store. `validate`: "fast" (metadata, indptr, files) or "full"
    (also decodes every chunk and checks every index and value)."""

    def __init__(self, path: str | Path, validate: str = "fast"):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            _fail(self.path, "not a cell store (no zarr.json)" if self.path.exists() else "no such store",
                  "pass the path of a directory written by `cellssl convert` or `cellssl synth`")
        self._check_metadata_sizes()
        try:
            self.group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
            attrs = dict(self.group.attrs)
        except Exception as exc:  # zarr raises several types for garbled metadata
            _fail(self.path / "zarr.json", f"unreadable store metadata ({exc})")
        if attrs.get("format") != FORMAT:
            _fail(self.path / "zarr.json", f"attribute format is {attrs.get('format')!r}, not {FORMAT!r}: a foreign "
                  "zarr group", "convert the data with `cellssl convert` first")
        if attrs.get("format_version") != FORMAT_VERSION:
            _fail(self.path / "zarr.json", f"format_version {attrs.get('format_version')!r}; this cellssl reads "
                  f"version {FORMAT_VERSION}", "reconvert the source with this cellssl, or install the cellssl that "
                  "wrote it")
        self.attrs = attrs
        try:
            self.n_cells, self.n_genes, self.nnz = int(attrs["n_cells"]), int(attrs["n_genes"]), int(attrs["nnz"])
            self.value_kind = attrs["value_kind"]
            self.splits = {str(k): (int(a), int(b)) for k, (a, b) in attrs["splits"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            _fail(self.path / "zarr.json", f"attributes missing or malformed ({type(exc).__name__}: {exc})")
        if min(self.n_cells, self.n_genes, self.nnz) < 0:
            _fail(self.path / "zarr.json", "negative n_cells, n_genes or nnz")
        self._validate_arrays()
        self._validate_tables()
        if validate == "full":
            self.verify_all()
        elif validate != "fast":
            raise ValueError(f"validate must be 'fast' or 'full', not {validate!r}")

    # --- validation ------------------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        try:
            return self.group[f"X/{name}"]
        except Exception:
            _fail(self.path / "X" / name, "array missing or unreadable")

    def _validate_arrays(self) -> None:
        from .chunks import check_chunk_keys

        for name in ("indptr", "indices", "data"):  # keys where cellssl reads them, or refused before any read
            check_chunk_keys(self.path / "X" / name)
        indptr, self._indices, self._data = self._array("indptr"), self._array("indices"), self._array("data")
        for arr, allowed in ((self._indices, _INDEX_DTYPES), (self._data, _DATA_DTYPES)):
            if str(arr.dtype) not in allowed:
                _fail(self.path / "X" / arr.basename, f"dtype {arr.dtype}, expected one of {sorted(allowed)}")
        self.index_dtype = np.dtype(str(self._indices.dtype))  # what batches' CSR indices come as
        if self._indices.dtype == np.uint16 and self.n_genes > 65535:
            _fail(self.path / "X/indices", f"uint16 indices cannot address {self.n_genes} genes")
        if self.value_kind not in VALUE_KINDS:
            _fail(self.path / "zarr.json", f"value_kind {self.value_kind!r} is not one of {VALUE_KINDS}")
        integral = self._data.dtype.kind in "ui"
        if integral != (self.value_kind == "counts"):
            _fail(self.path / "X/data", f"dtype {self._data.dtype} disagrees with value_kind {self.value_kind!r} "
                  "(counts are stored as integers, log1p_10k as float32)")
        if indptr.shape != (self.n_cells + 1,):
            _fail(self.path / "X/indptr", f"length {indptr.shape[0]}, expected n_cells + 1 = {self.n_cells + 1}")
        for arr in (self._indices, self._data):
            if arr.shape != (self.nnz,):
                _fail(self.path / "X" / arr.basename, f"length {arr.shape[0]}, expected nnz = {self.nnz}")
        self._check_chunk_files(indptr)  # before decoding: sizes the header claims must exist on disk
        self._check_indptr_size(indptr)
        self.indptr = self._decode(indptr, 0, self.n_cells + 1)
        if self.indptr[0] != 0 or self.indptr[-1] != self.nnz:
            _fail(self.path / "X/indptr", f"starts at {self.indptr[0]} and ends at {self.indptr[-1]}; expected 0 "
                  f"and nnz = {self.nnz}")
        if np.any(np.diff(self.indptr) < 0):
            bad = int(np.argmax(np.diff(self.indptr) < 0))
            _fail(self.path / "X/indptr", f"not monotonic (row {bad} ends before it starts)")
        bounds = sorted(self.splits.values())
        if [a for a, _ in bounds][:1] != [0] or bounds[-1][1] != self.n_cells or any(
                bounds[i][1] != bounds[i + 1][0] for i in range(len(bounds) - 1)):
            _fail(self.path / "zarr.json", f"splits {self.splits} do not tile [0, {self.n_cells})")

    def _check_metadata_sizes(self) -> None:
        """Metadata is read whole: a zarr.json of more than MAX_METADATA_BYTES is a crafted one, not ours."""
        for meta in [self.path / "zarr.json", *(self.path / "X").glob("**/zarr.json")]:
            if meta.is_file() and meta.stat().st_size > MAX_METADATA_BYTES:
                _fail(meta, f"{meta.stat().st_size:,} bytes of metadata; cellssl writes a few kB")

    def _check_indptr_size(self, indptr: zarr.Array) -> None:
        """Before indptr is decoded whole: its claimed size must be what its chunk files can hold. Real offsets
        compress about threefold; a header claiming hundreds of millions of cells over files of zeros (which
        compress a thousandfold) would otherwise make opening allocate gigabytes."""
        folder = self.path / "X" / "indptr" / "c"
        on_disk = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0
        claimed = 8 * (self.n_cells + 1)
        if claimed > MAX_INDPTR_RATIO * on_disk + (1 << 20):
            _fail(self.path / "X/indptr", f"claims {self.n_cells:,} cells ({claimed:,} bytes of offsets) in "
                  f"{on_disk:,} bytes of chunks: no real store compresses that far")

    def _check_chunk_files(self, indptr: zarr.Array) -> None:
        # zarr reads a missing chunk as fill_value; a deleted shard must be an error, not a run of zeros. Checked
        # before anything is decoded, so a header claiming more than the files hold allocates nothing.
        for arr in (indptr, self._indices, self._data):
            step = arr.shards[0] if arr.shards else arr.chunks[0]
            folder = self.path / "X" / arr.basename / "c"
            for i in range(-(-arr.shape[0] // step)):
                if not (folder / str(i)).is_file():
                    _fail(folder / str(i), "chunk file missing")

    def _validate_tables(self) -> None:
        for name, rows, per_row in (("obs.parquet", self.n_cells, 4096), ("var.parquet", self.n_genes, 1024)):
            try:
                meta = pq.ParquetFile(self.path / name).metadata
            except Exception as exc:
                _fail(self.path / name, f"missing or unreadable ({exc})")
            if meta.num_rows != rows:
                _fail(self.path / name, f"{meta.num_rows} rows, expected {rows}")
            # what reading it will allocate, as its metadata says (column data, then the schema's own metadata)
            unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            limit = MAX_METADATA_BYTES * 64 + per_row * rows
            if unpacked > limit or meta.serialized_size > limit:
                _fail(self.path / name, f"unpacks to {max(unpacked, meta.serialized_size):,} bytes for {rows:,} rows "
                      f"(at most {limit:,} is believable)")
        if self.genes.checksum() != self.attrs.get("var_checksum"):
            _fail(self.path / "var.parquet", "gene ids do not match var_checksum in zarr.json")
        if file_checksum(self.path / "obs.parquet") != self.attrs.get("obs_checksum"):
            _fail(self.path / "obs.parquet", "contents do not match obs_checksum in zarr.json (edited or damaged)")

    def _decode(self, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
        try:
            return arr[start:stop]
        except Exception as exc:
            _fail(self.path / "X" / arr.basename, f"elements [{start}, {stop}) cannot be decoded "
                  f"({type(exc).__name__}: {exc}); the store is damaged")

    def verify_all(self, nnz_per_step: int = 1 << 23, progress: bool = False) -> None:
        """Decode every chunk; check indices in range and sorted per row, values finite, >= 0."""
        from tqdm import tqdm

        bar = tqdm(total=self.n_cells, desc="verify", unit="cell", unit_scale=True, disable=not progress)
        start = 0
        while start < self.n_cells:
            stop = int(np.searchsorted(self.indptr, self.indptr[start] + nnz_per_step, side="right")) - 1
            stop = min(max(stop, start + 1), self.n_cells)
            indptr, indices, data = self.read_rows(start, stop)
            ascending = np.diff(indices.astype(np.int32)) > 0
            bounds = indptr[1:-1]
            ascending[bounds[(bounds > 0) & (bounds < len(indices))] - 1] = True  # rows restart low
            if not ascending.all():
                _fail(self.path / "X/indices", f"gene indices not strictly increasing within a row in [{start}, {stop})")
            if data.dtype.kind == "f" and not (np.isfinite(data).all() and (data >= 0).all()):
                _fail(self.path / "X/data", f"non-finite or negative values in rows [{start}, {stop})")
            bar.update(stop - start)
            start = stop
        bar.close()

    # --- reading ---------------------------------------------------------------------------------------
    @property
    def genes(self) -> GeneSpace:
        if not hasattr(self, "_genes"):
            var = pd.read_parquet(self.path / "var.parquet")
            self._genes = GeneSpace.from_lists(var["gene_id"], var["gene_name"])
        return self._genes

    @property
    def var(self) -> pd.DataFrame:
        return self.genes.to_frame()

    def __len__(self) -> int:
        return self.n_cells

    def split(self, name: str) -> tuple[int, int]:
        if name not in self.splits:
            raise CellStoreError(self.path, f"no {name!r} split (it has {sorted(self.splits)})",
                                 "convert the dataset with --split-by or --val-frac/--test-frac to give it one")
        return self.splits[name]

    FINGERPRINT = ("n_cells", "n_genes", "nnz", "value_kind", "splits", "shuffle_seed", "var_checksum",
                   "obs_checksum")

    def fingerprint(self, values: bool = False) -> dict:
        """The attributes that make two stores the same data, whatever path each is opened from; with `values`, also
        `values_checksum`, which reads every chunk's checksum (what a resume compares: a store whose values changed
        since is not the data the run trained on)."""
        found = {k: self.attrs.get(k) for k in self.FINGERPRINT}
        return {**found, "values_checksum": self.values_checksum()} if values else found

    def values_checksum(self) -> str:
        """sha256 over the crc32c of every chunk of X/indices and X/data (4 bytes read per chunk)."""
        import hashlib

        from .chunks import ShardedArray

        digest = hashlib.sha256()
        for name in ("indices", "data"):
            array = ShardedArray(self.path / "X" / name)
            try:
                digest.update(array.chunk_checksums())
            finally:
                array.close()
        return digest.hexdigest()

    @cached_property
    def checksum(self) -> str:
        """One hash of the fingerprint (what a saved loader position records)."""
        import hashlib

        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR triple of rows [start, stop): indptr rebased to 0, gene indices, values (store dtypes). Decoded by the
        loader's own chunk reader (loaders/chunks.py), so reading and full validation check what streaming checks."""
        from .chunks import ShardedArray

        if not 0 <= start <= stop <= self.n_cells:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.n_cells})")
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        ranges = np.array([[lo, hi]], np.int64)
        arrays = [ShardedArray(self.path / "X" / name) for name in ("indices", "data")]
        try:
            indices, data = (a.read(ranges) for a in arrays)
        finally:
            for a in arrays:
                a.close()
        if len(indices) and (indices.max() >= self.n_genes or (indices.dtype.kind == "i" and indices.min() < 0)):
            _fail(self.path / "X/indices", f"gene index out of range [0, {self.n_genes}) in rows [{start}, {stop})")
        return self.indptr[start:stop + 1] - lo, indices, data

    def to_scipy(self, start: int = 0, stop: int | None = None):
        import scipy.sparse as sp

        stop = self.n_cells if stop is None else stop
        indptr, indices, data = self.read_rows(start, stop)
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.n_genes))

    @cached_property
    def obs_columns(self) -> list[str]:
        return pq.read_schema(self.path / "obs.parquet").names

    @cached_property
    def categories(self) -> dict[str, list[str]]:
        """Full label list of each categorical obs column (codes index into it)."""
        meta = pq.read_schema(self.path / "obs.parquet").metadata or {}
        return json.loads(meta.get(CATEGORIES_KEY, b"{}"))

    def hierarchy(self, column: str) -> list[list[int]] | None:
        """The children (direct and indirect) of each code of a categorical column, where the source carried a
        hierarchy (scTab's cell types); None otherwise."""
        meta = pq.read_schema(self.path / "obs.parquet").metadata or {}
        children = json.loads(meta.get(HIERARCHY_KEY, b"{}")).get(column)
        if children is None:
            return None
        n = len(self.categories.get(column, []))
        if len(children) != n or not all(isinstance(c, int) and 0 <= c < n for kids in children for c in kids):
            _fail(self.path / "obs.parquet", f"the hierarchy of {column!r} does not match its {n} categories")
        return children

    def obs(self, columns: list[str] | None = None) -> pd.DataFrame:
        """obs in store order; categorical columns carry their full category list."""
        table = pq.read_table(self.path / "obs.parquet", columns=columns)
        frame = pd.DataFrame({name: self._column(table, name) for name in table.column_names})
        for name, cats in self.categories.items():
            if name in frame:
                frame[name] = pd.Categorical.from_codes(frame[name].to_numpy(), categories=cats)
        return frame

    def obs_codes(self, column: str) -> np.ndarray:
        """int64 codes of a categorical obs column (-1 for missing), or the values of a numeric one."""
        return self._column(pq.read_table(self.path / "obs.parquet", columns=[column]), column)

    def _column(self, table: pa.Table, name: str) -> np.ndarray:
        col = table.column(name)
        cats = self.categories.get(name)
        if cats is None:
            return col.to_numpy()
        lookup = {label: i for i, label in enumerate(cats)}
        out = []
        for chunk in col.chunks:
            remap = np.array([lookup[v] for v in chunk.dictionary.to_pylist()] + [-1], dtype=np.int64)
            idx = chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            out.append(remap[idx])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def source_order(self) -> np.ndarray:
        """Store rows in the order of the source the store was converted from (conversion shuffles cells within
        each split; `original_index` says where each came from)."""
        return np.argsort(self.obs_codes("original_index"), kind="stable")

    def cell_names(self) -> np.ndarray:
        """Each cell's name in its source (obs_names, 10x barcodes) in store order, as str; its position in the
        source where the source had no names (scTab, synthetic stores)."""
        column = "cell_id" if "cell_id" in self.obs_columns else "original_index"
        return self.obs([column])[column].astype(str).to_numpy(dtype=object)

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def open_store(path: str | Path | CellStore, validate: str = "fast") -> CellStore:
    return path if isinstance(path, CellStore) else CellStore(path, validate)


def remove_tree(path: Path) -> None:
    """rm -r that tolerates a path that never came to exist (a failed conversion's temp dir)."""
    import shutil

    if path.exists():
        shutil.rmtree(path)
