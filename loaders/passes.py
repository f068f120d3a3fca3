"""The passes of a conversion, through scratch buckets, each run by loaders/workers.py over worker processes:

1. spill: read, check and align every source row (loaders/rows.py) into the bucket of its (seeded, random) store
   position; split over the source's partitions (scTab part files, runs of CSR rows), each worker into its own files;
2. index: each bucket's row records in store order → obs.parquet and the row offsets (in this process: they are
   small, a few dozen bytes a cell);
3. write: gene indices and values, shard by shard, each shard by one process, read from the buckets that hold it;
4. verify: every shard decoded by the loader's reader and checked (indices in range and rising within each row,
   values finite and ≥ 0).

Each worker holds at most two buckets (BUCKET_BYTES each) and one shard of output at a time, so memory per worker is
bounded whatever the source's size; the store's bytes do not depend on the number of workers. Never imports engine
or kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from .chunks import ShardedArray
from .csr import take_rows
from .errors import CellStoreError, InputError
from .genes import GeneAlignment
from .rows import SourceRows, ValueKind
from .sources import Source
from .spill import Spill
from .store import TARGET_SUM, CellStoreWriter, index_dtype, write_values
from .workers import Workers

BUCKET_BYTES = 128 << 20     # scratch bucket size: what a worker holds of a bucket at once
CELL_ID = "cell_id"          # the source's name of each cell (obs_names, barcode), where it has names


def row_dtype(source: Source) -> np.dtype:
    fields = [("dest", np.int64), ("nnz", np.int64), ("original_index", np.int64)]
    fields += [(n, np.int32) for n in source.categories] + [(n, d) for n, d in source.numeric.items()]
    return np.dtype(fields)


@dataclass(frozen=True)
class Plan:
    """What pass 1 decides from the first chunk and every worker shares: the value kind and the bucket size."""

    kind: ValueKind
    bucket_rows: int


def make_plan(source: Source, values_per_row: float, kind: ValueKind, n_genes: int, log: Callable) -> Plan:
    if kind.scale != TARGET_SUM:
        log(f"{source.describe()}: values are log1p of counts per {kind.scale:,.6g}; rescaling them to log1p per "
            "10,000 (the store records source_scale)")
    per_row = row_dtype(source).itemsize + values_per_row * (index_dtype(n_genes).itemsize + 4)
    return Plan(kind, int(np.clip(BUCKET_BYTES // max(per_row, 1), 1024, max(source.n_cells, 1))))


@dataclass(frozen=True)
class Buckets:
    """The scratch buckets of one conversion: one folder per pass-1 worker, bucket b holding store rows
    [b · rows, (b + 1) · rows)."""

    roots: tuple[Path, ...]
    rows_dtype: np.dtype
    n_genes: int
    rows: int

    def spill(self, root: Path) -> Spill:
        return Spill(root, self.rows_dtype, {"idx": index_dtype(self.n_genes), "val": np.float32})

    def rows_of(self, b: int) -> np.ndarray:
        """Bucket b's row records, in store order."""
        rows = np.concatenate([self.spill(r).rows(b) for r in self.roots])
        return rows[np.argsort(rows["dest"], kind="stable")]

    def elements_of(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Bucket b's gene indices and values in store order."""
        parts = [self.spill(r).read(b) for r in self.roots]
        rows = np.concatenate([p[0] for p in parts])
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(rows["nnz"], out=offsets[1:])
        _, pos = take_rows(offsets, np.argsort(rows["dest"], kind="stable"))
        return (np.concatenate([p[1]["idx"] for p in parts])[pos], np.concatenate([p[1]["val"] for p in parts])[pos])


# --- 1. spill ------------------------------------------------------------------------------------------------------
def spill_range(source: Source | tuple, alignment: GeneAlignment, dest: np.ndarray, buckets: Buckets, root: Path,
                scratch: Path, start: int, stop: int, plan: Plan | None, requested_kind, ticks) -> tuple[float, Plan]:
    """Rows [start, stop) of the source (or of the one its spec opens, in a worker process) into their buckets under
    `root` (`dest`: their store rows). Returns (largest value, plan); the plan is made from the first chunk when none
    is given."""
    if isinstance(source, tuple):
        cls, args, kwargs = source
        source = cls(*args, **kwargs)
    reader = SourceRows(source, alignment, plan.kind if plan else None, requested_kind)
    spill = buckets.spill(root)
    for chunk, (indptr, cols, vals) in reader.chunks(scratch, start, stop):
        plan = plan or make_plan(source, len(vals) / max(len(chunk), 1), reader.kind, buckets.n_genes, _ignore)
        n = len(chunk)
        rows = np.zeros(n, buckets.rows_dtype)
        rows["original_index"] = np.arange(chunk.start, chunk.start + n)
        rows["dest"] = dest[chunk.start - start:chunk.start - start + n]
        rows["nnz"] = np.diff(indptr)
        for name, values in chunk.obs.items():
            rows[name] = values
        order = np.argsort(rows["dest"] // plan.bucket_rows, kind="stable")
        new_indptr, pos = take_rows(indptr, order)
        spill.append_split(rows["dest"][order] // plan.bucket_rows, rows[order], new_indptr,
                           {"idx": cols[pos].astype(index_dtype(buckets.n_genes)), "val": vals[pos]})
        ticks.put(n)
    if plan is None:
        raise InputError(source.describe(), "holds no cells", "convert a source with at least one cell")
    return reader.max_value, plan


def _ignore(_: str) -> None:
    pass


def first_plan(source: Source, alignment: GeneAlignment, scratch: Path, part: tuple[int, int], requested_kind,
               log: Callable) -> Plan:
    """The plan every worker shares, from the first chunk of the first part (read again by its worker: it is small)."""
    reader = SourceRows(source, alignment, None, requested_kind)
    chunk, (_, _, vals) = next(iter(reader.chunks(scratch, *part)))
    return make_plan(source, len(vals) / max(len(chunk), 1), reader.kind, len(alignment.target), log)


def spill_pass(source: Source, alignment: GeneAlignment, dest: np.ndarray, scratch: Path, requested_kind,
               progress: bool, workers: Workers, log: Callable) -> tuple[Buckets, Plan, float]:
    """Pass 1: returns the buckets, the plan and the largest value."""
    parts = source.partitions(workers.n) if workers.n > 1 else [(0, source.n_cells)]
    roots = tuple(scratch / f"buckets-{w}" for w in range(len(parts)))
    plan = first_plan(source, alignment, scratch / "first", parts[0], requested_kind, log) if len(parts) > 1 else None
    shape = (row_dtype(source), len(alignment.target))
    with tqdm(total=source.n_cells, desc="read+shuffle", unit="cell", unit_scale=True, disable=not progress) as bar:
        results = workers.run(spill_range, [
            (source.spec() if len(parts) > 1 else source, alignment, dest[a:b],
             Buckets(roots, *shape, plan.bucket_rows if plan else 0), root,
             scratch / f"source-{w}", a, b, plan, requested_kind) for w, ((a, b), root) in enumerate(zip(parts, roots))],
            bar.update)
    if plan is None:
        plan = results[0][1]
        if plan.kind.scale != TARGET_SUM:
            make_plan(source, 0, plan.kind, shape[1], log)  # say so once
    return Buckets(roots, *shape, plan.bucket_rows), plan, max(m for m, _ in results)


# --- 2. index ------------------------------------------------------------------------------------------------------
def obs_table(rows: np.ndarray, source: Source, dictionaries: dict[str, pa.Array]) -> pa.Table:
    cols = {}
    if source.cell_names is not None:
        cols[CELL_ID] = pa.array(source.cell_names[rows["original_index"]], pa.string())
    for name, dictionary in dictionaries.items():
        codes = rows[name]
        cols[name] = pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), dictionary)
    for name in source.numeric:
        cols[name] = pa.array(rows[name])
    cols["original_index"] = pa.array(rows["original_index"])
    return pa.table(cols)


def index_pass(buckets: Buckets, n_cells: int, source: Source, writer: CellStoreWriter) -> np.ndarray:
    """Pass 2: obs rows in store order and the row offsets (indptr), which it returns."""
    dictionaries = {n: pa.array(c, pa.string()) for n, c in source.categories.items()}
    indptr = np.zeros(n_cells + 1, np.int64)
    for b, start in enumerate(range(0, n_cells, buckets.rows)):
        rows = buckets.rows_of(b)
        if not np.array_equal(rows["dest"], np.arange(start, min(start + buckets.rows, n_cells))):
            raise RuntimeError(f"scratch bucket {b} lost or duplicated rows (internal error)")
        writer.write_obs(obs_table(rows, source, dictionaries))
        np.cumsum(rows["nnz"], out=indptr[start + 1:start + 1 + len(rows)])
        indptr[start + 1:start + 1 + len(rows)] += indptr[start]
    return indptr


# --- 3. write and 4. verify: tasks of whole shards --------------------------------------------------------------
def shard_tasks(nnz: int, shard: int, workers: int) -> list[tuple[int, int]]:
    """Element ranges of whole shards, a few per worker (balanced), covering [0, nnz)."""
    shards = max(1, -(-nnz // shard))
    cuts = np.linspace(0, shards, min(shards, 4 * max(1, workers)) + 1).round().astype(int)
    return [(int(a) * shard, min(int(b) * shard, nnz)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _cells_in(indptr: np.ndarray, lo: int, hi: int) -> int:
    """Cells whose values start in [lo, hi) (an empty cell where its offset lies): each cell counted once."""
    last = hi if hi < indptr[-1] else indptr[-1] + 1
    return int(np.searchsorted(indptr[:-1], last, side="left") - np.searchsorted(indptr[:-1], lo, side="left"))


def write_range(tmp: Path, buckets: Buckets, bucket_starts: np.ndarray, lo: int, hi: int, shard: int, value_dtype,
                cells: int, ticks) -> None:
    """The shards of elements [lo, hi), one at a time, gathered from the buckets that hold them."""
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for a in range(lo, hi, shard):
        b_ = min(a + shard, hi)
        first, last = np.searchsorted(bucket_starts, [a, b_ - 1], side="right") - 1
        parts = []
        for b in range(first, last + 1):
            if b not in cache:
                cache = {k: v for k, v in cache.items() if k >= first}  # at most two buckets held
                cache[b] = buckets.elements_of(b)
            idx, val = cache[b]
            s0, s1 = max(a, bucket_starts[b]) - bucket_starts[b], min(b_, bucket_starts[b + 1]) - bucket_starts[b]
            parts.append((idx[s0:s1], val[s0:s1]))
        write_values(tmp, a, np.concatenate([p[0] for p in parts]),
                     np.concatenate([p[1] for p in parts]).astype(value_dtype))
    ticks.put(cells)


def verify_range(tmp: Path, indptr_slice: np.ndarray, lo: int, hi: int, n_genes: int, cells: int, ticks) -> None:
    """Decode elements [lo, hi) with the loader's reader and check them; `indptr_slice`: offsets of the rows
    overlapping the range."""
    arrays = [ShardedArray(tmp / "X" / name) for name in ("indices", "data")]
    try:
        indices, data = (a.read(np.array([[lo, hi]], np.int64)) for a in arrays)
    finally:
        for a in arrays:
            a.close()
    where = f"values [{lo}, {hi})"
    if len(indices) and (int(indices.max()) >= n_genes or (indices.dtype.kind == "i" and int(indices.min()) < 0)):
        raise CellStoreError(tmp / "X/indices", f"gene index out of range in {where}", "report this: it is a bug")
    rising = np.diff(indices.astype(np.int64)) > 0
    starts = indptr_slice[(indptr_slice > lo) & (indptr_slice < hi)] - lo  # where a new row begins
    rising[starts - 1] = True
    if not rising.all():
        raise CellStoreError(tmp / "X/indices", f"gene indices not rising within a row in {where}", "report this")
    if data.dtype.kind == "f" and not (np.isfinite(data).all() and (data >= 0).all()):
        raise CellStoreError(tmp / "X/data", f"non-finite or negative values in {where}", "report this")
    ticks.put(cells)


def write_and_verify(tmp: Path, buckets: Buckets, indptr: np.ndarray, shard: int, value_dtype, n_genes: int,
                     workers: Workers, progress: bool) -> None:
    """Passes 3 and 4 over the same shard ranges."""
    nnz = int(indptr[-1])
    ranges = shard_tasks(nnz, shard, workers.n)
    bucket_starts = np.append(indptr[0:len(indptr) - 1:buckets.rows], nnz)  # each bucket's first element
    cells = [_cells_in(indptr, lo, hi) for lo, hi in ranges]
    with tqdm(total=len(indptr) - 1, desc="write", unit="cell", unit_scale=True, disable=not progress) as bar:
        workers.run(write_range, [(tmp, buckets, bucket_starts, lo, hi, shard, value_dtype, c)
                                  for (lo, hi), c in zip(ranges, cells)], bar.update)
    tasks = []
    for (lo, hi), c in zip(ranges, cells):
        r0 = max(int(np.searchsorted(indptr, lo, side="right")) - 1, 0)
        r1 = int(np.searchsorted(indptr, hi, side="left"))
        tasks.append((tmp, indptr[r0:r1 + 1], lo, hi, n_genes, c))
    with tqdm(total=len(indptr) - 1, desc="verify", unit="cell", unit_scale=True, disable=not progress) as bar:
        workers.run(verify_range, tasks, bar.update)
