"""A hurried or hostile user: two writers of one folder, links in a run folder, values out of range, sources that
mix kinds of values or are malformed, crafted stores and models, divergence, launch environments that would hang,
resumes of moved, edited or changed runs. Each ends in one line (exit status 2) and loses no data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import make_anndata, random_counts, write_10x
from test_trainer import ROOT, free_port, losses, recipe_args, run

from cellssl.engine.cli import main
from cellssl.loaders import CellStoreError, InputError
from cellssl.loaders.convert import convert, open_source
from cellssl.loaders.lock import FolderLock


def recipe(*args, env=None, timeout=300):
    """A recipe run that is expected to fail: (exit status, stderr)."""
    done = subprocess.run([sys.executable, "recipes/mae_random.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "MASTER_PORT": str(free_port()),
                                                           **(env or {})})
    return done.returncode, done.stderr


# --- one writer per folder -----------------------------------------------------------------------------------------
def test_a_run_or_evaluation_folder_being_written_is_refused(synthetic_store, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out / ".lock", "a test"):
        code, err = recipe(*recipe_args(synthetic_store, out, 2), "--overwrite")
        assert code == 2 and f"is being written by process {os.getpid()}" in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # --overwrite deleted nothing
        ev = tmp_path / "ev"
        ev.mkdir()
        with FolderLock(ev / ".lock", "a test"):
            assert main(["eval", "--data", str(synthetic_store), "--out", str(ev), "--tasks", "cell_type"]) == 2
            assert "is being written by process" in capsys.readouterr().err


def test_a_run_never_writes_through_a_link(synthetic_store, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").symlink_to(victim)
    code, err = recipe(*recipe_args(synthetic_store, out, 2), "--overwrite")
    assert code == 2 and "is a symbolic link" in err
    assert victim.read_text() == "keep me"


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"from cellssl.loaders.lock import FolderLock; import time; "
                               f"FolderLock({str(tmp_path / '.lock')!r}, 'x').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(InputError, match=f"process {holder.pid}"):
        FolderLock(tmp_path / ".lock", "y").acquire()
    holder.kill()
    holder.wait()
    FolderLock(tmp_path / ".lock", "y").acquire().release()
    assert not (tmp_path / ".lock").exists()


# --- every value checked before any work -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--lr", "-1"], ["--lr", "nan"], ["--batch-size", "0"], ["--rate", "1.0"],
                                 ["--dropout", "1.0"], ["--max-steps", "0"], ["--hidden", "0,5"], ["--latent", "0"],
                                 ["--gradient-accumulation", "0"], ["--weight-decay", "-0.1"]])
def test_out_of_range_values_are_refused_before_anything(bad, tmp_path, capsys):
    from cellssl.engine.recipe import run_experiment

    with pytest.raises(SystemExit) as stop:
        run_experiment(["mae_random", "--out", str(tmp_path / "run"), *bad])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and f"{bad[0]}: " in err, err
    assert not (tmp_path / "run").exists()


# --- conversion never changes data silently --------------------------------------------------------------------------
def test_a_later_row_of_another_kind_stops_the_conversion(tmp_path, counts, monkeypatch):
    import cellssl.loaders.sources.h5ad as h5ad_module

    x = counts.copy().astype(np.float32)
    head = x[:150]
    head.data = np.log1p(head.data / np.repeat(np.asarray(head.sum(1)).ravel(), np.diff(head.indptr)) * 1e4)
    x[:150] = head  # rows 0–149 log1p per 10k, rows 150–299 raw counts
    make_anndata(x).write_h5ad(tmp_path / "mixed.h5ad")
    monkeypatch.setattr(h5ad_module, "ELEMENTS_PER_CHUNK", 500)  # several chunks: the kind comes from the first
    with pytest.raises(InputError, match=r"cell 1[5-9]\d \(source order\) is not log1p .* mixes kinds"):
        convert(open_source("h5ad", tmp_path / "mixed.h5ad"), tmp_path / "out", genes="keep", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.h5ad"]


@pytest.mark.parametrize("damage,message", [("index_high", "gene column 60 outside"), ("index_negative", "outside"),
                                            ("indptr", "row offsets"), ("duplicate", "more than once")])
def test_a_malformed_sparse_matrix_is_refused_not_repaired(tmp_path, counts, damage, message):
    path = tmp_path / "bad.h5ad"
    make_anndata(counts).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        indices, indptr = f["X/indices"], f["X/indptr"]
        if damage == "index_high":
            indices[7] = 60
        elif damage == "index_negative":
            values = indices[:].astype(np.int64)
            del f["X/indices"]
            values[7] = -1
            f["X"].create_dataset("indices", data=values)
        elif damage == "indptr":
            indptr[10] = indptr[12] + 1
        else:
            row = int(np.argmax(np.diff(indptr[:]) >= 2))
            indices[indptr[row] + 1] = indices[indptr[row]]
    with pytest.raises(InputError, match=message):
        convert(open_source("h5ad", path), tmp_path / "out", genes="keep", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]


def test_paired_modalities_left_out_or_incomplete_are_reported(tmp_path, counts):
    import anndata as ad

    adata = make_anndata(counts)
    protein = np.random.default_rng(0).random((counts.shape[0], 4)).astype(np.float32)
    protein[3, 1] = np.nan
    adata.obsm["protein"] = protein
    adata.uns["atac_names"] = ["a", "b"]
    adata.write_h5ad(tmp_path / "a.h5ad")
    with h5py.File(tmp_path / "a.h5ad", "r+") as f:  # a matrix with the wrong number of rows (anndata forbids it)
        f["obsm"].create_dataset("atac", data=np.zeros((counts.shape[0] - 1, 2), np.float32))
    report = open_source("h5ad", tmp_path / "a.h5ad").report()
    assert "obsm['protein'] holds 1 NaN/infinite values" in report and "left out obsm['atac'] (299 rows" in report
    del ad


def test_duplicate_10x_barcodes_are_refused(tmp_path):
    folder = write_10x(tmp_path / "tenx", random_counts(n=40), gz=False)
    lines = (folder / "barcodes.tsv").read_text().splitlines()
    lines[5] = lines[4]
    (folder / "barcodes.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="1 barcode\\(s\\) appear more than once"):
        open_source("10x", folder)


def test_an_h5ad_split_column_is_honoured_or_the_choice_is_said(tmp_path, counts):
    make_anndata(counts).write_h5ad(tmp_path / "in.h5ad")
    said = []
    store = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "own", genes="keep", progress=False,
                    log=said.append)
    obs = store.obs()
    original = make_anndata(counts).obs["split"].to_numpy()
    for name, (a, b) in store.splits.items():
        assert set(original[obs["original_index"].to_numpy()[a:b]]) == {name}
    assert any("using its own obs column 'split'" in s for s in said)
    said.clear()
    convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "drawn", genes="keep", progress=False,
            val_frac=0.2, log=said.append)
    assert any("obs column 'split' is not used: --val-frac/--test-frac were given" in s for s in said)


# --- crafted stores ------------------------------------------------------------------------------------------------
def test_a_store_claiming_more_cells_than_its_files_hold_is_refused_cheaply(synthetic_store, tmp_path):
    """200 million cells claimed over chunk files of zeros (they compress a thousandfold): refused before the
    offsets are decoded; opening stays far below a gigabyte."""
    import zarr

    crafted = tmp_path / "crafted.cellstore"
    shutil.copytree(synthetic_store, crafted)
    n = 200_000_000
    shutil.rmtree(crafted / "X" / "indptr")
    arr = zarr.open_group(str(crafted / "X"), mode="a").create_array(
        "indptr", shape=(n + 1,), dtype="int64", chunks=(1 << 20,), compressors=[zarr.codecs.ZstdCodec(level=22)],
        fill_value=-1)  # zeros differ from the fill value: every chunk is written
    for i in range(-(-(n + 1) // (1 << 20))):
        arr[i << 20:min((i + 1) << 20, n + 1)] = 0  # every chunk file present, holding zeros
    meta = json.loads((crafted / "zarr.json").read_text())
    meta["attributes"]["n_cells"] = n
    (crafted / "zarr.json").write_text(json.dumps(meta))
    probe = ("import sys; from cellssl.loaders import CellStore, CellStoreError\n"  # VmHWM: this process's peak
             "try:\n    CellStore(sys.argv[1])\nexcept CellStoreError as e:\n    print(e)\n"
             "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    done = subprocess.run([sys.executable, "-c", probe, str(crafted)], capture_output=True, text=True, timeout=300)
    message, rss_kb = done.stdout.strip().splitlines()
    assert "claims 200,000,000 cells" in message and int(rss_kb) < 1_000_000


def test_an_array_layout_cellssl_does_not_write_is_refused(synthetic_store, tmp_path):
    from cellssl.loaders.chunks import ShardedArray

    crafted = tmp_path / "s.cellstore"
    shutil.copytree(synthetic_store, crafted)
    meta_path = crafted / "X" / "data" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["index_location"] = "start"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CellStoreError, match="a layout cellssl does not write|an array layout cellssl does not write"):
        ShardedArray(crafted / "X" / "data")


def test_zarr_v2_chunk_keys_are_refused_at_open(synthetic_store, tmp_path):
    """A store whose arrays declare zarr v2's chunk keys is refused when opened (stream, info and embed all open it
    first), not read through as if its keys were ours."""
    from cellssl.loaders import CellStore

    crafted = tmp_path / "s.cellstore"
    shutil.copytree(synthetic_store, crafted)
    meta_path = crafted / "X" / "indices" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "/"}}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CellStoreError, match="chunk keys encoded as .*'v2'"):
        CellStore(crafted)
    assert main(["info", str(crafted)]) == 2


# --- models and outputs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model(synthetic_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "run"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 2)])
    return out / "model.safetensors"


def test_a_pretrained_encoder_of_other_widths_is_one_line(synthetic_store, small_model, tmp_path):
    done = subprocess.run([sys.executable, "recipes/finetune.py", "--data", str(synthetic_store), "--out",
                           str(tmp_path / "ft"), "--init-encoder", str(small_model), "--hidden", "256,128",
                           "--max-steps", "1", "--batch-size", "64"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 2 and "the pretrained encoder is 512-512-256-256 → 64, this run's 256-128 → 64" in \
        done.stderr and done.stderr.count("\n") == 1


def test_a_model_whose_metadata_lies_is_one_line(small_model, synthetic_store, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    meta = __import__("safetensors").safe_open(str(small_model), "pt").metadata()
    config = json.loads(meta["config"])
    config["model"]["hidden"] = [128, 128]
    crafted = tmp_path / "m.safetensors"
    save_file(load_file(str(small_model)), str(crafted), metadata={**meta, "config": json.dumps(config)})
    assert main(["embed", str(crafted), str(synthetic_store), str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err
    assert "its weights and its config disagree" in err and err.count("\n") == 1
    save_file(load_file(str(small_model)), str(crafted), metadata={**meta, "config": "{not json"})
    assert main(["embed", str(crafted), str(synthetic_store), str(tmp_path / "e.parquet")]) == 2
    assert "cellssl: error:" in capsys.readouterr().err


def test_upgrade_model_refuses_to_replace_an_output(small_model, tmp_path, capsys):
    import torch

    from cellssl.engine.checkpoint import load_model

    saved = load_model(small_model)
    old = tmp_path / "model.pt"
    torch.save({k: saved[k] for k in ("config", "gene_ids", "state_dict")}, old)
    (tmp_path / "model.safetensors").write_bytes(b"mine")
    assert main(["upgrade-model", str(old)]) == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == b"mine"
    assert main(["upgrade-model", str(old), "--overwrite"]) == 0


# --- divergence ----------------------------------------------------------------------------------------------------
def test_an_absurd_learning_rate_stops_with_a_finite_last_checkpoint(synthetic_store, tmp_path):
    out = tmp_path / "run"
    for lr in ("1e38", "1e30"):  # the update overflows float32 itself; the weights overflow after it
        code, err = recipe(*recipe_args(synthetic_store, out, 5), "--lr", lr, "--checkpoint-every", "1",
                           "--overwrite")
        said = [line for line in err.splitlines() if line.startswith("cellssl: error")]
        assert code == 2 and len(said) == 1 and "Traceback" not in err, err
        assert any(w in said[0] for w in ("overflowed", "non-finite", "loss is nan", "loss is inf")), said
    assert not (out / "model.safetensors").exists()
    if (out / "checkpoints" / "latest").exists():  # whatever was saved is a good checkpoint
        import torch

        tag = (out / "checkpoints" / "latest").read_text()
        state = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())


NAN_VALIDATION = """
import sys
from cellssl.engine import validation
validation.Validator.__call__ = lambda self, engine: {"val_loss": float("nan")}
from cellssl.engine.recipe import run
run("mae_random", sys.argv[1:])
"""


def test_a_non_finite_validation_loss_stops_the_run_without_a_model(synthetic_store, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", NAN_VALIDATION, *recipe_args(synthetic_store, out, 6)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 2 and "validation loss is nan at step 3" in done.stderr
    assert not (out / "model.safetensors").exists() and sorted(losses(out)) == [1, 2, 3]


# --- never a silent hang -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env,message", [({"RANK": "1", "WORLD_SIZE": "1"}, "rank 1 of world size 1"),
                                         ({"RANK": "0"}, "only RANK is set"),
                                         ({"RANK": "0", "WORLD_SIZE": "x"}, "is not an integer"),
                                         ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                           "LOCAL_RANK": "0", "CELLSSL_RENDEZVOUS_TIMEOUT": "3"},
                                          "not all 2 ranks arrived within 3 s")])
def test_an_environment_that_cannot_start_is_one_line(synthetic_store, tmp_path, env, message):
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, tmp_path / "r", 1)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**clean, "MASTER_PORT": str(free_port()), **env})
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


# --- resume ---------------------------------------------------------------------------------------------------------
def test_resume_of_a_moved_edited_or_changed_run(synthetic_store, tmp_path):
    straight, first = tmp_path / "straight", tmp_path / "first"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, straight, 6)])
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, first, 3)])
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    edited = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**edited, "lr": 0.5}))
    code, err = recipe(*recipe_args(synthetic_store, moved, 6), "--resume")
    assert code == 2 and "config.json: was edited after the run started (lr differs" in err and "cp " in err
    (moved / "config.json").write_text(json.dumps(edited))
    changed = tmp_path / "changed.cellstore"
    shutil.copytree(synthetic_store, changed)
    shard = changed / "X" / "data" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    per_shard = json.loads((changed / "X" / "data" / "zarr.json").read_text())["chunk_grid"]["configuration"][
        "chunk_shape"][0] // json.loads((changed / "X" / "data" / "zarr.json").read_text())["codecs"][0][
        "configuration"]["chunk_shape"][0]
    offset, nbytes = np.frombuffer(bytes(raw[-(16 * per_shard + 4):-4]), "<u8")[:2]
    raw[offset + nbytes - 1] ^= 0x01  # chunk 0's checksum: as if its values had been rewritten
    shard.write_bytes(bytes(raw))
    code, err = recipe(*recipe_args(changed, moved, 6), "--resume")
    assert code == 2 and "values_checksum was" in err
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, moved, 6), "--resume"])
    assert losses(moved) == losses(straight)


def test_options_the_data_or_objective_cannot_honour_are_refused(synthetic_store, tmp_path):
    """--select val_macro_f1 without a classifier; a step larger than the split (batch × accumulation × ranks);
    validation chunks other than the batch where the loss couples the cells; more ranks than cells gets a fix that
    makes sense."""
    from cellssl.loaders.sampler import BlockShuffleSampler

    code, err = recipe(*recipe_args(synthetic_store, tmp_path / "a", 2), "--select", "val_macro_f1")
    assert code == 2 and "--select val_macro_f1: mae has no classifier" in err
    code, err = recipe(*recipe_args(synthetic_store, tmp_path / "b", 2), "--batch-size", "32",
                       "--gradient-accumulation", "1000000")
    assert code == 2 and "= 32,000,000 cells a step exceeds the 1,200 cells" in err
    done = subprocess.run([sys.executable, "recipes/barlow_twins.py", *recipe_args(synthetic_store, tmp_path / "c", 2),
                           "--val-batch-size", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 2 and "--val-batch-size: 16 with barlow_twins" in done.stderr
    with pytest.raises(InputError, match="use fewer ranks and less accumulation: their product may be at most 1,200"):
        BlockShuffleSampler(0, 1200, 1, rank=0, world_size=5000)


def test_a_one_process_run_builds_no_communication_op(synthetic_store, tmp_path):
    """One process talks to nobody: a fresh extensions cache stays without DeepSpeed's shared-memory comm op."""
    cache = tmp_path / "extensions"
    code, err = recipe(*recipe_args(synthetic_store, tmp_path / "r", 1), env={"TORCH_EXTENSIONS_DIR": str(cache)})
    assert code == 0, err[-2000:]
    assert not list(cache.rglob("*shm*")) and "building DeepSpeed's CPU communication op" not in err


def test_bad_data_found_in_a_worker_process_is_the_same_one_line(tmp_path):
    """With several worker processes (the default `--workers auto`), a malformed row late in the file is refused with
    the line one worker gives (file, cell, fix), never a BrokenProcessPool traceback; nothing partial stays."""
    path = tmp_path / "bad.h5ad"
    counts = random_counts(n=3000)
    make_anndata(counts).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        f["X/indices"][f["X/indptr"][2700] + 1] = 60
    for workers in (1, 2):
        with pytest.raises(InputError, match="gene column 60 outside .* cell 2700") as caught:
            convert(open_source("h5ad", path), tmp_path / "out", genes="keep", progress=False, workers=workers)
        assert type(caught.value).__name__ in ("InputError", "CellStoreError")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]
