"""Source → cell store: align genes, assign splits, shuffle within each split, write, verify, rename.

Two passes in bounded memory. Pass 1 reads the source in order, checks and aligns every row and appends it to
the scratch bucket that holds its (seeded, random) destination. Pass 2 reads the buckets in order, sorts each
and appends it to the store. The store is written under a temporary name, fully verified, then renamed, so an
interrupted or failed conversion never leaves a store that opens. Never imports engine or kernels.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from .csr import take_rows
from .errors import InputError
from .genes import GeneAlignment, GeneSpace, align_genes
from .rows import SourceRows, ValueKind
from .sources import H5adSource, RowChunk, ScTabSource, Source, TenxSource
from .spill import Spill, disk_error
from .store import FORMAT, SPLITS, TARGET_SUM, CellStore, CellStoreWriter, Layout, index_dtype, remove_tree

BUCKET_BYTES = 128 << 20     # scratch bucket size: what pass 2 holds in memory at once
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def resolve_genes(spec: str | Path, source: GeneSpace) -> GeneSpace:
    """--genes: "keep" (the source's own), "default" (the packaged 19,350), a cell store, or a gene-list file."""
    if str(spec) == "keep":
        return source
    if str(spec) == "default":
        return GeneSpace.default()
    path = Path(spec)
    if (path / "zarr.json").is_file():
        return CellStore(path).genes
    return GeneSpace.from_file(path)


def assign_splits(source: Source, split_by: str | None, val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """Per source cell, the index into SPLITS: from a column, from the format itself, or seeded fractions."""
    if split_by is not None:
        labels = np.array([SPLIT_ALIASES.get(str(v).lower(), "") for v in source.column(split_by)], dtype=object)
        if (labels == "").any():
            bad = sorted({str(v) for v, lab in zip(source.column(split_by), labels) if lab == ""})[:5]
            raise InputError(f"{source.path}:obs/{split_by}", f"values {bad} are not train/val/test",
                             "rename them, or split with --val-frac/--test-frac instead")
    elif source.natural_splits is not None:
        labels = source.natural_splits
    else:
        if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
            raise InputError("--val-frac/--test-frac", f"{val_frac} and {test_frac} must be in [0, 1) and sum below 1")
        n = source.n_cells
        n_test, n_val = round(n * test_frac), round(n * val_frac)
        labels = np.full(n, "train", dtype=object)
        order = np.random.default_rng([seed, 1]).permutation(n)
        labels[order[:n_test]], labels[order[n_test:n_test + n_val]] = "test", "val"
    return np.array([SPLITS.index(v) for v in labels], dtype=np.int8)


def destinations(split_codes: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Store position of every source cell: splits contiguous in SPLITS order, a seeded shuffle inside each."""
    rng = np.random.default_rng([seed, 2])
    dest = np.empty(len(split_codes), np.int64)
    splits, start = {}, 0
    for code, name in enumerate(SPLITS):
        members = np.flatnonzero(split_codes == code)
        dest[members] = start + rng.permutation(len(members))
        if len(members):
            splits[name] = (start, start + len(members))
        start += len(members)
    return dest, splits



CELL_ID = "cell_id"  # the source's name of each cell (obs_names, barcode), where it has names


def _obs_schema(source: Source) -> pa.Schema:
    fields = [pa.field(CELL_ID, pa.string())] if source.cell_names is not None else []
    fields += [pa.field(n, pa.dictionary(pa.int32(), pa.string())) for n in source.categories]
    fields += [pa.field(n, pa.from_numpy_dtype(d)) for n, d in source.numeric.items()]
    return pa.schema(fields + [pa.field("original_index", pa.int64())])


def _row_dtype(source: Source) -> np.dtype:
    fields = [("dest", np.int64), ("nnz", np.int64), ("original_index", np.int64)]
    fields += [(n, np.int32) for n in source.categories] + [(n, d) for n, d in source.numeric.items()]
    return np.dtype(fields)


def _obs_table(rows: np.ndarray, source: Source, dictionaries: dict[str, pa.Array]) -> pa.Table:
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


@dataclass(frozen=True)
class _Plan:
    """What pass 1 decides from the first chunk and every worker shares: the value kind and the bucket size."""

    kind: ValueKind
    bucket_rows: int


def _plan(source: Source, first: RowChunk, kind: ValueKind, n_genes: int) -> _Plan:
    if kind.scale != TARGET_SUM:
        _stderr(f"{source.describe()}: values are log1p of counts per {kind.scale:,.6g}; rescaling them to log1p "
                "per 10,000 (the store records source_scale)")
    per_row = _row_dtype(source).itemsize + (len(first.data) / max(len(first), 1)) * (index_dtype(n_genes).itemsize + 4)
    return _Plan(kind, int(np.clip(BUCKET_BYTES // max(per_row, 1), 1024, max(source.n_cells, 1))))


def _spill_range(source: Source, alignment: GeneAlignment, dest: np.ndarray, root: Path, scratch: Path, start: int,
                 stop: int, plan: _Plan | None, requested_kind, tick: Callable[[int], None]) -> tuple[int, float, _Plan]:
    """Read, check and align rows [start, stop) (loaders/rows.py) into their destination buckets under `root`;
    `dest` holds the destinations of those rows. Returns (rows seen, largest value, plan)."""
    n_genes = len(alignment.target)
    reader = SourceRows(source, alignment, plan.kind if plan else None, requested_kind)
    row_dtype, spill = _row_dtype(source), Spill(root, _row_dtype(source), {"idx": index_dtype(n_genes),
                                                                              "val": np.float32})
    for chunk, (indptr, cols, vals) in reader.chunks(scratch, start, stop):
        plan = plan or _plan(source, chunk, reader.kind, n_genes)
        n = len(chunk)
        rows = np.zeros(n, row_dtype)
        rows["original_index"] = np.arange(chunk.start, chunk.start + n)
        rows["dest"] = dest[chunk.start - start:chunk.start - start + n]
        rows["nnz"] = np.diff(indptr)
        for name, values in chunk.obs.items():
            rows[name] = values
        order = np.argsort(rows["dest"] // plan.bucket_rows, kind="stable")
        new_indptr, pos = take_rows(indptr, order)
        spill.append_split(rows["dest"][order] // plan.bucket_rows, rows[order], new_indptr,
                           {"idx": cols[pos].astype(index_dtype(n_genes)), "val": vals[pos]})
        tick(n)
    if plan is None:
        raise InputError(source.describe(), "holds no cells", "convert a source with at least one cell")
    return stop - start, reader.max_value, plan


def _spill_worker(task) -> tuple[int, float]:
    """One process's share of pass 1 (spawned: it reopens the source from its path)."""
    source_type, path, alignment, dest, root, scratch, start, stop, plan, requested_kind, ticks = task
    source = source_type(path)
    seen, max_value, _ = _spill_range(source, alignment, dest, root, scratch, start, stop, plan, requested_kind,
                                      ticks.put)
    return seen, max_value


def _spill_pass(source: Source, alignment: GeneAlignment, dest: np.ndarray, scratch: Path, requested_kind,
                progress: bool, workers: int = 1) -> tuple[list[Spill], _Plan, float]:
    """Pass 1 over the whole source, split over `workers` processes where the format allows (scTab: runs of part
    files); every worker spills into its own bucket files, which pass 2 reads together. Returns the spills, the
    plan and the largest value."""
    bar = tqdm(total=source.n_cells, desc="read+shuffle", unit="cell", unit_scale=True, disable=not progress)
    parts = source.partitions(workers) if workers > 1 else [(0, source.n_cells)]
    roots = [scratch / f"buckets-{w}" for w in range(len(parts))]
    row_dtype = _row_dtype(source)
    n_genes = len(alignment.target)
    try:
        if len(parts) == 1:
            _, max_value, plan = _spill_range(source, alignment, dest, roots[0], scratch / "source", 0,
                                              source.n_cells, None, requested_kind, bar.update)
        else:
            plan = _first_plan(source, alignment, scratch / "source", parts[0], requested_kind)
            max_value = _run_workers(source, alignment, dest, roots, scratch, parts, plan, requested_kind, bar)
    finally:
        bar.close()
    spills = [Spill(root, row_dtype, {"idx": index_dtype(n_genes), "val": np.float32}) for root in roots]
    return spills, plan, max_value


def _first_plan(source, alignment, scratch, part, requested_kind) -> _Plan:
    """The plan every worker shares, from the first chunk of the first part (read twice: it is small)."""
    reader = SourceRows(source, alignment, None, requested_kind)
    chunk, _ = next(iter(reader.chunks(scratch, *part)))
    return _plan(source, chunk, reader.kind, len(alignment.target))


def _run_workers(source, alignment, dest, roots, scratch, parts, plan, requested_kind, bar) -> float:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # never fork a process whose libraries run threads
    with context.Manager() as manager, ProcessPoolExecutor(len(parts), mp_context=context) as pool:
        ticks = manager.Queue()
        futures = [pool.submit(_spill_worker, (type(source), source.path, alignment, dest[a:b], root,
                                               scratch / f"source-{w}", a, b, plan, requested_kind, ticks))
                   for w, ((a, b), root) in enumerate(zip(parts, roots))]
        while not all(f.done() for f in futures):
            try:
                bar.update(ticks.get(timeout=0.2))
            except Exception:  # queue.Empty through the manager's proxy
                pass
        results = [f.result() for f in futures]  # re-raises a worker's InputError as itself
        while not ticks.empty():
            bar.update(ticks.get())
    return max(m for _, m in results)


def _write_pass(spills: list[Spill], bucket_rows: int, n_cells: int, writer: CellStoreWriter, source: Source,
                value_dtype, progress: bool) -> None:
    """Pass 2: each bucket back in destination order, appended to the store."""
    dictionaries = {n: pa.array(c, pa.string()) for n, c in source.categories.items()}
    bar = tqdm(total=n_cells, desc="write", unit="cell", unit_scale=True, disable=not progress)
    for b, start in enumerate(range(0, n_cells, bucket_rows)):
        popped = [spill.pop(b) for spill in spills]  # every worker's share of the bucket
        rows = np.concatenate([r for r, _ in popped])
        elems = {k: np.concatenate([e[k] for _, e in popped]) for k in popped[0][1]}
        order = np.argsort(rows["dest"])
        expected = np.arange(start, min(start + bucket_rows, n_cells))
        if not np.array_equal(rows["dest"][order], expected):
            raise RuntimeError(f"scratch bucket {b} lost or duplicated rows (internal error)")
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(rows["nnz"], out=offsets[1:])
        _, pos = take_rows(offsets, order)
        rows = rows[order]
        writer.append(rows["nnz"], elems["idx"][pos], elems["val"][pos].astype(value_dtype),
                      _obs_table(rows, source, dictionaries))
        bar.update(len(rows))
    bar.close()


def _counts_dtype(max_value: float):
    return np.uint16 if max_value <= np.iinfo(np.uint16).max else np.uint32


def _install(tmp: Path, dst: Path) -> None:
    """Put the verified store at dst; an old store there is moved aside first and removed only afterwards."""
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, trash)
        os.rename(tmp, dst)
        remove_tree(trash)
    else:
        os.rename(tmp, dst)


def is_cell_store(path: Path) -> bool:
    """A directory whose zarr.json says format "cellstore" (any version): the only thing --overwrite replaces."""
    import json

    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(dst: Path, overwrite: bool) -> None:
    if not dst.exists():
        if not dst.parent.is_dir():
            raise InputError(dst, "its parent folder does not exist", "create it first")
        return
    if not overwrite:
        raise InputError(dst, "already exists", "pass --overwrite to replace it, or choose another path")
    if not dst.is_dir() or not is_cell_store(dst):
        raise InputError(dst, "exists and is not a cell store (its zarr.json does not say format \"cellstore\"); "
                         "refusing to replace it", "choose another path, or move it away yourself")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|scratch|old)-(?P<pid>\d+)$")


def remove_leftovers(dst: Path, log: Callable[[str], None] = _stderr) -> None:
    """Clear what a killed conversion into `dst` left beside it (`.NAME.tmp-PID`, `.NAME.scratch-PID`,
    `.NAME.old-PID` of processes that no longer exist). A moved-aside old store comes back if nothing replaced it."""
    if not dst.parent.is_dir():
        return
    for path in sorted(dst.parent.iterdir()):
        m = _LEFTOVER.match(path.name)
        if not m or m["name"] != dst.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not dst.exists() and is_cell_store(path):
            os.rename(path, dst)
            log(f"restored {dst} from {path.name}, left by an interrupted conversion (process {m['pid']})")
            continue
        remove_tree(path) if path.is_dir() else path.unlink()
        log(f"removed {path}, left by an interrupted conversion (process {m['pid']})")


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's kill, `kill PID`) unwinds like Ctrl-C, so the finally-clauses remove the temporary
    store and the scratch buckets. Only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def convert(source: Source, dst: str | Path, *, genes: str | Path = "keep", split_by: str | None = None,
            val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0, overwrite: bool = False,
            value_kind: str | None = None, layout: Layout = Layout(), progress: bool = True,
            log: Callable[[str], None] = _stderr, workers: int = 1) -> CellStore:
    """Convert an opened source into a verified cell store at `dst` and return it opened. `workers`: processes for
    the first pass where the format can be split (scTab's part files); the store is byte-identical either way."""
    dst = Path(dst)
    remove_leftovers(dst, log)
    check_destination(dst, overwrite)
    alignment = align_genes(source.genes, resolve_genes(genes, source.genes), source.describe())
    log(f"{source.describe()}: {source.n_cells:,} cells; {alignment.report()}"
        + (f"; {source.report()}" if source.report() else ""))
    split_codes = assign_splits(source, split_by, val_frac, test_frac, seed)
    dest, splits = destinations(split_codes, seed)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    scratch = dst.with_name(f".{dst.name}.scratch-{os.getpid()}")
    with _terminate_as_interrupt():
        kind, splits = _convert(source, dst, tmp, scratch, alignment, dest, splits, seed, value_kind, layout,
                                progress, max(1, workers))
    log(f"wrote {dst} ({kind}, splits {splits})")
    return CellStore(dst)


def _convert(source, dst, tmp, scratch, alignment, dest, splits, seed, value_kind, layout, progress, workers):
    """The two passes, verification and installation; the temporary store and scratch never outlive it."""
    try:
        spills, plan, max_value = _spill_pass(source, alignment, dest, scratch, value_kind, progress, workers)
        kind = plan.kind.kind
        value_dtype = _counts_dtype(max_value) if kind == "counts" else np.float32
        writer = CellStoreWriter(tmp, alignment.target, kind, value_dtype, _obs_schema(source), source.categories,
                                 layout)
        _write_pass(spills, plan.bucket_rows, source.n_cells, writer, source, value_dtype, progress)
        extra = {"gene_alignment": alignment.report(), "source_scale": plan.kind.scale}
        if source.report():
            extra["kept"] = source.report()
        writer.finish(splits, seed, source.describe(), extra)
        remove_tree(scratch)
        CellStore(tmp).verify_all(progress=progress)
        _install(tmp, dst)
    except OSError as exc:
        raise disk_error(dst, exc) from exc
    finally:
        remove_tree(scratch)
        remove_tree(tmp)
    return kind, splits


def open_source(fmt: str, path: str | Path, **options) -> Source:
    """The reader for `fmt` in {"h5ad", "sctab", "10x"}; options go to its constructor (h5ad: layer)."""
    readers = {"h5ad": H5adSource, "sctab": ScTabSource, "10x": TenxSource}
    if fmt not in readers:
        raise ValueError(f"unknown source format {fmt!r}: choose from {sorted(readers)}")
    return readers[fmt](path, **options)
