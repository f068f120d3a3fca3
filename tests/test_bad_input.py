"""Bad input: one clear error naming the file and the problem, and nothing left behind."""
from __future__ import annotations

import errno
import json

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import make_anndata, write_10x

from cellssl.loaders import CellStore, CellStoreError, InputError
from cellssl.loaders.convert import convert, open_source


def leftovers(folder, name="out"):
    return sorted(p.name for p in folder.iterdir() if name in p.name)


def convert_h5ad(tmp_path, x, **kw):
    adata = make_anndata(x) if not isinstance(x, type(make_anndata)) else x
    adata.write_h5ad(tmp_path / "in.h5ad")
    return convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "out", genes=kw.pop("genes", "keep"),
                   progress=False, **kw)


def test_missing_and_garbled_files(tmp_path):
    with pytest.raises(InputError, match="nope.h5ad: file not found"):
        open_source("h5ad", tmp_path / "nope.h5ad")
    (tmp_path / "garbled.h5ad").write_bytes(b"\x00not hdf5" * 100)
    with pytest.raises(InputError, match="garbled.h5ad: not a readable HDF5"):
        open_source("h5ad", tmp_path / "garbled.h5ad")
    with pytest.raises(InputError, match="no matrix.mtx"):
        open_source("10x", tmp_path)
    with pytest.raises(InputError, match="var.parquet: missing"):
        open_source("sctab", tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_non_finite_or_negative_values(tmp_path, counts, bad):
    x = counts.copy().astype(np.float32)
    x.data[7] = bad
    with pytest.raises(InputError, match=r"in.h5ad.*non-finite or negative value .* at cell \d+ .*gene ENSG"):
        convert_h5ad(tmp_path, x)
    assert leftovers(tmp_path) == []


def test_counts_requested_but_not_integer(tmp_path, counts):
    x = counts.copy().astype(np.float32)
    x.data[3] += 0.5
    with pytest.raises(InputError, match="non-integer value in a counts matrix"):
        convert_h5ad(tmp_path, x, value_kind="counts")
    assert leftovers(tmp_path) == []


def test_normalised_values_of_unknown_kind(tmp_path, counts):
    x = counts.copy().astype(np.float32)
    x.data = x.data / 3.7
    with pytest.raises(InputError, match="not integer counts and not log1p of counts per a constant total.*--value-kind"):
        convert_h5ad(tmp_path, x)


def test_genes_matching_nothing(tmp_path, counts):
    (tmp_path / "mouse.tsv").write_text("gene_id\tgene_name\nENSMUSG00000000001\tGnai3\n")
    with pytest.raises(InputError, match="none of its 60 genes .* matches the 1-gene target space"):
        convert_h5ad(tmp_path, counts, genes=tmp_path / "mouse.tsv")
    assert leftovers(tmp_path) == []


def test_duplicated_gene_ids(tmp_path, counts):
    adata = make_anndata(counts)
    ids = list(adata.var["gene_id"])
    ids[3] = ids[2]
    adata.var["gene_id"] = ids
    adata.var_names = [f"v{i}" for i in range(len(ids))]
    adata.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(InputError, match=r"dup.h5ad.*1 duplicated gene ids \(ENSG00000000003\)"):
        convert(open_source("h5ad", tmp_path / "dup.h5ad"), tmp_path / "out", genes="keep", progress=False)


def test_output_exists_refused_unless_overwrite(tmp_path, counts):
    first = convert_h5ad(tmp_path, counts)
    with pytest.raises(InputError, match="out: already exists. Fix: pass --overwrite"):
        convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "out", genes="keep", progress=False)
    again = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "out", genes="keep", progress=False,
                    overwrite=True, seed=5)
    assert again.attrs["shuffle_seed"] == 5 and first.n_cells == again.n_cells
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    with pytest.raises(InputError, match="not a cell store .*refusing to replace it"):
        convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "precious", genes="keep", overwrite=True,
                progress=False)
    assert (tmp_path / "precious" / "thesis.tex").exists()
    foreign = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)  # someone's zarr hierarchy
    foreign.attrs["format"] = "not-ours"
    foreign.create_array("x", shape=(3,), dtype="i4")
    with pytest.raises(InputError, match="other.zarr: exists and is not a cell store"):
        convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "other.zarr", genes="keep", overwrite=True,
                progress=False)
    assert (tmp_path / "other.zarr" / "x").is_dir()


def test_synth_overwrite_replaces_only_its_own_outputs(tmp_path):
    from cellssl.loaders.synth import synth

    (tmp_path / "notes.h5ad").write_text("my notes, not HDF5")
    with pytest.raises(InputError, match="exists and is not an h5ad file; refusing"):
        synth(tmp_path / "notes.h5ad", 10, "h5ad", overwrite=True, progress=False)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match="exists and is not an scTab-layout folder; refusing"):
        synth(tmp_path / "folder", 10, "sctab-parquet", overwrite=True, progress=False)
    assert (tmp_path / "notes.h5ad").read_text() == "my notes, not HDF5" and (tmp_path / "folder" / "data.csv").exists()


def test_disk_full_leaves_nothing(tmp_path, counts, monkeypatch):
    from cellssl.loaders import passes

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(passes, "write_values", full)  # the store's values, shard by shard
    with pytest.raises(InputError, match="disk full while converting; nothing was kept"):
        convert_h5ad(tmp_path, counts)
    assert leftovers(tmp_path) == []


def test_disk_full_while_spilling_keeps_old_store(tmp_path, counts, monkeypatch):
    from cellssl.loaders import spill

    convert_h5ad(tmp_path, counts)
    monkeypatch.setattr(spill.np, "ascontiguousarray", lambda a: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(InputError, match="disk full"):
        convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "out", genes="keep", overwrite=True,
                progress=False)
    assert leftovers(tmp_path) == ["out"]
    CellStore(tmp_path / "out", validate="full")


def test_interrupted_conversion_leaves_no_store(tmp_path, counts, monkeypatch):
    import cellssl.loaders.convert as conv

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "write_and_verify", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_h5ad(tmp_path, counts)
    assert leftovers(tmp_path) == []


def test_10x_truncated_matrix(tmp_path, counts):
    folder = write_10x(tmp_path / "tenx", counts, gz=False)
    lines = (folder / "matrix.mtx").read_text().splitlines()
    (folder / "matrix.mtx").write_text("\n".join(lines[:-10]) + "\n")
    with pytest.raises(InputError, match="matrix.mtx: holds .* entries, the header promises"):
        convert(open_source("10x", folder), tmp_path / "out", genes="keep", progress=False)
    assert leftovers(tmp_path) == []


# --- damaged stores --------------------------------------------------------------------------------------

@pytest.fixture
def store_path(tmp_path, counts):
    return convert_h5ad(tmp_path, counts).path


def test_not_a_store(tmp_path):
    with pytest.raises(CellStoreError, match="no such store"):
        CellStore(tmp_path / "missing")
    with pytest.raises(CellStoreError, match="not a cell store"):
        CellStore(tmp_path)
    zarr.open_group(str(tmp_path / "foreign"), mode="w", zarr_format=3)
    with pytest.raises(CellStoreError, match="foreign"):
        CellStore(tmp_path / "foreign")


def test_other_format_version(store_path):
    meta = json.loads((store_path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (store_path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CellStoreError, match="format_version 99; this cellssl reads version 2"):
        CellStore(store_path)


def test_edited_cell_table_is_detected(store_path):
    table = pd.read_parquet(store_path / "obs.parquet")
    table.loc[0, "cell_type"] = table.loc[1, "cell_type"]
    table.to_parquet(store_path / "obs.parquet")
    with pytest.raises(CellStoreError, match="obs.parquet: contents do not match obs_checksum"):
        CellStore(store_path)


def test_value_kind_must_match_the_data_dtype(store_path):
    meta = json.loads((store_path / "zarr.json").read_text())
    meta["attributes"]["value_kind"] = "log1p_10k"  # the data are integer counts
    (store_path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CellStoreError, match="dtype uint16 disagrees with value_kind 'log1p_10k'"):
        CellStore(store_path)


@pytest.mark.parametrize("claim", [10**12, 2**40])
def test_a_header_claiming_huge_sizes_allocates_nothing(store_path, claim):
    import resource

    for path, key in ((store_path / "zarr.json", "attributes"), (store_path / "X" / "indptr" / "zarr.json", None)):
        meta = json.loads(path.read_text())
        if key:
            meta[key]["n_cells"] = claim
        else:
            meta["shape"] = [claim + 1]
        path.write_text(json.dumps(meta))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CellStoreError, match="chunk file missing"):
        CellStore(store_path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB: nothing near the claim


def test_a_crafted_shard_index_allocates_nothing(store_path):
    from cellssl.loaders.chunks import ShardedArray

    shard = store_path / "X" / "indices" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    arr = ShardedArray(store_path / "X" / "indices")
    n = 16 * arr.per_shard + 4
    index = np.frombuffer(bytes(raw[-n:-4]), "<u8").copy().reshape(-1, 2)
    index[0] = [0, 1 << 40]  # chunk 0 claims a terabyte
    body = index.tobytes()
    import google_crc32c

    raw[-n:] = body + google_crc32c.value(body).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    with pytest.raises(CellStoreError, match="claims bytes .* beyond the end of the file"):
        ShardedArray(store_path / "X" / "indices").decode_chunk(0)


def test_indptr_not_monotonic(store_path):
    arr = zarr.open_array(str(store_path / "X" / "indptr"), mode="r+")
    values = arr[:]
    values[10], values[11] = values[11] + 5, values[10]
    arr[:] = values
    with pytest.raises(CellStoreError, match="indptr: not monotonic"):
        CellStore(store_path)


def test_indices_out_of_range(store_path):
    arr = zarr.open_array(str(store_path / "X" / "indices"), mode="r+")
    values = arr[:]
    values[42] = 60000
    arr[:] = values
    store = CellStore(store_path)  # fast open does not decode the matrix ...
    with pytest.raises(CellStoreError, match="gene index out of range"):
        store.read_rows(0, store.n_cells)  # ... but every read checks what it decodes
    with pytest.raises(CellStoreError, match="gene index out of range"):
        CellStore(store_path, validate="full")


def test_corrupted_chunk(store_path):
    shard = store_path / "X" / "data" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CellStoreError, match="X/data/c/0: chunk 0 (checksum mismatch|cannot be decoded).* damaged"):
        CellStore(store_path, validate="full")


def test_truncated_chunk(store_path):
    shard = store_path / "X" / "indices" / "c" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    store = CellStore(store_path)
    with pytest.raises(CellStoreError, match="X/indices"):
        store.read_rows(0, store.n_cells)


def test_missing_chunk_file(store_path):
    (store_path / "X" / "data" / "c" / "0").unlink()
    with pytest.raises(CellStoreError, match="chunk file missing"):
        CellStore(store_path)


def test_obs_rows_mismatch(store_path):
    pd.DataFrame({"a": [1, 2]}).to_parquet(store_path / "obs.parquet")
    with pytest.raises(CellStoreError, match="obs.parquet: 2 rows, expected 300"):
        CellStore(store_path)


def test_unsorted_indices_within_a_row(store_path):
    store = CellStore(store_path)
    row = int(np.argmax(np.diff(store.indptr) > 3))
    lo = int(store.indptr[row])
    arr = zarr.open_array(str(store_path / "X" / "indices"), mode="r+")
    values = arr[:]
    values[lo], values[lo + 1] = values[lo + 1], values[lo]
    arr[:] = values
    with pytest.raises(CellStoreError, match="not strictly increasing within a row"):
        CellStore(store_path, validate="full")


# --- interrupted conversions -----------------------------------------------------------------------------

def _default_signals():
    """In the child: Ctrl-C handled as in a terminal, even when the suite runs as a background job (which ignores
    SIGINT, and a process started with SIGINT ignored would never see it)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_conversion(dst, cells=40_000, args=None):
    import subprocess
    import sys

    args = args or ["synth", str(dst), "--cells", str(cells), "--quiet"]
    return subprocess.Popen([sys.executable, "-m", "cellssl.engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _wait_for(folder, proc, name, what="scratch"):
    """Until the conversion into `name` is in its phase `what`: reading ("scratch") or writing the store ("tmp")."""

    found = lambda: [p for p in folder.iterdir() if p.name.startswith(f".{name}.{what}-")]  # noqa: E731
    _until(proc, lambda: found() and (what != "tmp" or (found()[0] / "X" / "data").is_dir()))


def _until(proc, ready) -> None:
    """Poll `ready()` until it holds, while `proc` runs (within 120 s)."""
    import time

    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before it was interrupted"
        time.sleep(0.02)


_wait_for_scratch = _wait_for


@pytest.mark.parametrize("sig,phase", [("SIGTERM", "scratch"), ("SIGINT", "scratch"), ("SIGINT", "tmp")])
def test_a_signalled_conversion_removes_its_temporary_files(tmp_path, sig, phase):
    import signal

    proc = _start_conversion(tmp_path / "a.cellstore")
    _wait_for(tmp_path, proc, "a.cellstore", phase)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; nothing partial was kept" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_conversion_are_removed_by_the_next(tmp_path):
    import signal

    proc = _start_conversion(tmp_path / "a.cellstore")
    _wait_for_scratch(tmp_path, proc, "a.cellstore")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left and all(name.startswith(".a.cellstore.") for name in left)
    import contextlib
    import io

    from cellssl.engine.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["synth", str(tmp_path / "a.cellstore"), "--cells", "300", "--quiet"]) == 0
    assert all(f"removed {tmp_path / name}, left by an interrupted conversion (process {proc.pid})" in err.getvalue()
               for name in left if not name.endswith(".lock"))  # a dead process's lock is simply taken over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cellstore"]
    assert CellStore(tmp_path / "a.cellstore").n_cells == 300


def _spawned_children(pid: int) -> list:
    """The live processes `pid` started through multiprocessing's spawn: its pool's workers and their manager."""
    import psutil

    found = []
    for child in psutil.Process(pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone, or a zombie, meanwhile
            pass
    return found


def test_ctrl_c_stops_the_worker_processes_too(tmp_path):
    """A conversion reading with worker processes, interrupted: the workers are stopped (not left running until
    their part is done) and nothing stays behind. The signal goes as soon as both workers and their queue's manager
    exist, never after a fixed wait: a fast machine converts this input in a few seconds, and a Ctrl-C after the
    store is written tests nothing."""
    import signal

    import psutil

    from cellssl.loaders.synth import synth

    synth(tmp_path / "big.h5ad", 20_000, "h5ad", progress=False)
    proc = _start_conversion(None, args=["convert", "h5ad", str(tmp_path / "big.h5ad"), str(tmp_path / "b"),
                                         "--workers", "2", "--quiet"])
    _wait_for(tmp_path, proc, "b", "scratch")
    _until(proc, lambda: len(_spawned_children(proc.pid)) >= 3)
    workers = _spawned_children(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5ad"]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker processes outlived the conversion: {[w.pid for w in alive]}"


def test_a_second_writer_of_a_destination_is_refused(tmp_path, counts, capsys):
    """One conversion (or synth) into a destination at a time: the lock names the holder; it dies with it."""
    import os

    from cellssl.engine.cli import main
    from cellssl.loaders.convert import destination_lock

    make_anndata(counts).write_h5ad(tmp_path / "in.h5ad")
    with destination_lock(tmp_path / "out"):
        assert main(["convert", "h5ad", str(tmp_path / "in.h5ad"), str(tmp_path / "out"), "--quiet"]) == 2
        assert f"is being written by process {os.getpid()}" in capsys.readouterr().err
        assert main(["synth", str(tmp_path / "out"), "--cells", "100", "--quiet"]) == 2
    assert main(["convert", "h5ad", str(tmp_path / "in.h5ad"), str(tmp_path / "out"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out"]
