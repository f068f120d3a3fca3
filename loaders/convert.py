"""Source → cell store: align genes, assign splits, shuffle within each split, write, verify, rename.

The passes (loaders/passes.py: spill, index, write, verify) run in bounded memory, over worker processes where
they can (`workers`); the store is the same, byte for byte, for any number of them. It is written under a
temporary name, fully verified, then renamed, so an interrupted or failed conversion never leaves a store that
opens; one conversion writes a destination at a time (a lock beside it). Never imports engine or kernels.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from .errors import InputError
from .genes import GeneSpace, align_genes
from .lock import FolderLock
from .passes import CELL_ID, index_pass, spill_pass, write_and_verify
from .sources import H5adSource, ScTabSource, Source, TenxSource
from .spill import disk_error
from .store import (
    FORMAT,
    SPLIT_ALIASES,
    SPLITS,
    CellStore,
    CellStoreWriter,
    Layout,
    remove_tree,
)
from .workers import Workers


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


DEFAULT_FRACTIONS = (0.1, 0.1)  # validation and test shares of a split drawn here


def _column_splits(source: Source, column: str) -> np.ndarray | None:
    """The column's values as train/val/test labels, or None if any value is not one of them."""
    values = source.column(column)
    labels = np.array([SPLIT_ALIASES.get(str(v).lower(), "") for v in values], dtype=object)
    return None if (labels == "").any() else labels


def assign_splits(source: Source, split_by: str | None, val_frac: float | None, test_frac: float | None, seed: int,
                  log: Callable[[str], None] = _stderr) -> np.ndarray:
    """Per source cell, the index into SPLITS: from --split-by, else (no fractions given) from the format's own
    splits or an obs column named `split`, else seeded fractions. Whatever is used instead of a split the source
    carries is said."""
    fractions = val_frac is not None or test_frac is not None
    own = "split" if split_by is None and "split" in source.columns() else None
    if split_by is not None:
        labels = _column_splits(source, split_by)
        if labels is None:
            bad = sorted({str(v) for v in source.column(split_by)} - set(SPLIT_ALIASES))[:5]
            raise InputError(f"{source.path}:obs/{split_by}", f"values {bad} are not train/val/test",
                             "rename them, or split with --val-frac/--test-frac instead")
    elif not fractions and source.natural_splits is not None:
        labels = source.natural_splits
    elif not fractions and own and (labels := _column_splits(source, own)) is not None:
        log(f"{source.describe()}: using its own obs column {own!r} as the train/val/test split (pass "
            "--val-frac/--test-frac to draw one instead)")
    else:
        if source.natural_splits is not None or own:
            log(f"{source.describe()}: {'its own train/val/test' if source.natural_splits is not None else 'obs column ' + repr(own)} "
                f"is not used: {'--val-frac/--test-frac were given' if fractions else 'its values are not all train/val/test'}"
                "; drawing a seeded split")
        labels = _drawn_splits(source.n_cells, *(f if f is not None else d for f, d in zip((val_frac, test_frac),
                                                                                         DEFAULT_FRACTIONS)), seed)
    return np.array([SPLITS.index(v) for v in labels], dtype=np.int8)


def _drawn_splits(n: int, val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise InputError("--val-frac/--test-frac", f"{val_frac} and {test_frac} must be in [0, 1) and sum below 1")
    n_test, n_val = round(n * test_frac), round(n * val_frac)
    labels = np.full(n, "train", dtype=object)
    order = np.random.default_rng([seed, 1]).permutation(n)
    labels[order[:n_test]], labels[order[n_test:n_test + n_val]] = "test", "val"
    return labels


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



def _obs_schema(source: Source) -> pa.Schema:
    fields = [pa.field(CELL_ID, pa.string())] if source.cell_names is not None else []
    fields += [pa.field(n, pa.dictionary(pa.int32(), pa.string())) for n in source.categories]
    fields += [pa.field(n, pa.from_numpy_dtype(d)) for n, d in source.numeric.items()]
    return pa.schema(fields + [pa.field("original_index", pa.int64())])


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


def destination_lock(dst: Path) -> FolderLock:
    """The lock one conversion into `dst` holds (a file beside it: `dst` does not exist yet)."""
    return FolderLock(dst.with_name(f".{dst.name}.lock"), f"a conversion into {dst.name}")


def convert(source: Source, dst: str | Path, *, genes: str | Path = "keep", split_by: str | None = None,
            val_frac: float | None = None, test_frac: float | None = None, seed: int = 0, overwrite: bool = False,
            value_kind: str | None = None, layout: Layout = Layout(), progress: bool = True,
            log: Callable[[str], None] = _stderr, workers: int = 1, lock: bool = True) -> CellStore:
    """Convert an opened source into a verified cell store at `dst` and return it opened. `workers`: processes for
    the first pass where the format can be split (scTab's part files); the store is byte-identical either way.
    Splits: --split-by, else the source's own, else `val_frac`/`test_frac` (0.1 each). `lock`: take `dst`'s lock
    (False when the caller holds it)."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        raise InputError(dst, "its parent folder does not exist", "create it first")
    held = destination_lock(dst).acquire() if lock else None
    try:
        remove_leftovers(dst, log)
        check_destination(dst, overwrite)
        alignment = align_genes(source.genes, resolve_genes(genes, source.genes), source.describe())
        log(f"{source.describe()}: {source.n_cells:,} cells; {alignment.report()}"
            + (f"; {source.report()}" if source.report() else ""))
        dest, splits = destinations(assign_splits(source, split_by, val_frac, test_frac, seed, log), seed)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        scratch = dst.with_name(f".{dst.name}.scratch-{os.getpid()}")
        with _terminate_as_interrupt():
            kind, splits = _convert(source, dst, tmp, scratch, alignment, dest, splits, seed, value_kind, layout,
                                    progress, max(1, workers), log)
    finally:
        if held is not None:
            held.release()
    log(f"wrote {dst} ({kind}, splits {splits})")
    return CellStore(dst)


def _convert(source, dst, tmp, scratch, alignment, dest, splits, seed, value_kind, layout, progress, workers, log):
    """The passes (loaders/passes.py), then installation; the temporary store and scratch never outlive this."""
    try:
        with Workers(workers) as pool:
            kind = _passes(source, alignment, dest, splits, seed, value_kind, layout, progress, pool, log, tmp,
                           scratch)
        remove_tree(scratch)
        CellStore(tmp)  # the fast checks of every open (metadata, files, offsets, tables) on what was written
        _install(tmp, dst)
    except OSError as exc:
        raise disk_error(dst, exc) from exc
    finally:
        remove_tree(scratch)
        remove_tree(tmp)
    return kind, splits


def _passes(source, alignment, dest, splits, seed, value_kind, layout, progress, workers, log, tmp, scratch) -> str:
    """Spill, index, write and verify (loaders/passes.py) into the temporary store; returns its value kind."""
    buckets, plan, max_value = spill_pass(source, alignment, dest, scratch, value_kind, progress, workers, log)
    kind = plan.kind.kind
    value_dtype = _counts_dtype(max_value) if kind == "counts" else np.float32
    nnz = sum(int(buckets.spill(r).rows(b)["nnz"].sum()) for r in buckets.roots
              for b in range(-(-source.n_cells // buckets.rows)))
    writer = CellStoreWriter(tmp, alignment.target, kind, value_dtype, _obs_schema(source), source.categories,
                             source.n_cells, nnz, layout, source.hierarchy)
    indptr = index_pass(buckets, source.n_cells, source, writer)
    writer.write_offsets(indptr)
    extra = {"gene_alignment": alignment.report(), "source_scale": plan.kind.scale}
    if source.report():
        extra["kept"] = source.report()
    writer.finish(splits, seed, source.describe(), extra)
    write_and_verify(tmp, buckets, indptr, layout.shard, value_dtype, len(alignment.target), workers, progress)
    return kind


def open_source(fmt: str, path: str | Path, **options) -> Source:
    """The reader for `fmt` in {"h5ad", "sctab", "10x"}; options go to its constructor (h5ad: layer)."""
    readers = {"h5ad": H5adSource, "sctab": ScTabSource, "10x": TenxSource}
    if fmt not in readers:
        raise ValueError(f"unknown source format {fmt!r}: choose from {sorted(readers)}")
    return readers[fmt](path, **options)
