"""The benchmarks, on pytest-benchmark: every baseline or peer measured in the same run as ours, grouped so that
bench/render.py can put each beside its reference. Each benchmark records `cells` (per round) in extra_info, and
`role` (ours, baseline, peer, ceiling); subprocess peers also record the cells/s they measured themselves.

    pytest bench --benchmark-only [--quick] --benchmark-json=bench/results.json
    python bench/render.py bench/results.json
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cellssl import kernels
from cellssl.loaders import TARGET_SUM, BatchStream

GENES = 19_350


def record(benchmark, role: str, cells: int, reference: bool = False, **extra) -> None:
    """`reference`: the row of its group the others are compared with (render.py); `label`: the row's name."""
    label = benchmark.name.split("[", 1)[-1].rstrip("]")
    benchmark.extra_info.update({"role": role, "cells": cells, "reference": reference, "label": label, **extra})


# --- kernels: ours vs the reference code's eager formulation --------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_inputs(size):
    from kernels import programme_bits  # bench/kernels.py

    gen = torch.Generator().manual_seed(0)
    b = size["batch"]
    counts = torch.poisson(torch.rand(b, GENES, generator=gen) ** 8 * 3, generator=gen)
    x = torch.log1p(counts / counts.sum(1, keepdim=True).clamp(min=1) * 1e4)
    pred = (x + 0.1 * torch.randn(b, GENES, generator=gen)).contiguous()
    bits, members = programme_bits(GENES)
    csr = counts.to_sparse_csr()
    return {"x": x, "pred": pred, "bits": bits, "members": members,
            "csr": (csr.crow_indices(), csr.col_indices().to(torch.int32), csr.values())}


def _kernel_ops(k):
    from paper_style import eager_csr_to_dense, eager_nb_augment, eager_programme_mask, eager_random_mask_loss

    from kernels import ours_random_mask_loss

    x, pred = k["x"], k["pred"]
    return {
        "random mask + loss": (lambda: ours_random_mask_loss(x, pred), lambda: eager_random_mask_loss(x, pred)),
        "gene-programme mask": (lambda: kernels.gene_program_mask(x, k["bits"], 0.5, 0, 1, "batch"),
                                lambda: eager_programme_mask(x, k["members"])),
        "NB augmentation": (lambda: kernels.nb_augment(x, 0.1, 0, 1, TARGET_SUM), lambda: eager_nb_augment(x)),
        "CSR → dense + log1p": (lambda: kernels.csr_to_dense(*k["csr"], GENES, TARGET_SUM),
                                lambda: eager_csr_to_dense(*k["csr"], GENES)),
    }


@pytest.mark.parametrize("impl", ["ours", "eager"])
@pytest.mark.parametrize("op", ["random mask + loss", "gene-programme mask", "NB augmentation",
                                "CSR → dense + log1p"])
def test_kernel(benchmark, kernel_inputs, size, op, impl):
    benchmark.group = f"kernel: {op}"
    fn = _kernel_ops(kernel_inputs)[op][0 if impl == "ours" else 1]
    record(benchmark, "ours" if impl == "ours" else "baseline (eager)", size["batch"], reference=impl == "eager")
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


# --- training steps: ours vs the reference code's per-element work, beside the matmul ceiling ---------------------
TRAINED = ("mae_random", "mae_gene_program", "mae_gp_to_tf", "byol", "barlow_twins")


@pytest.mark.parametrize("impl", ["ours", "paper-style"])
@pytest.mark.parametrize("name", TRAINED)
def test_training_step(benchmark, store, size, name, impl):
    """The Trainer's own step (bench/train.py builds the trainers): ours as a run trains, and the paper-style
    objective through the same step."""
    from paper_style import PAPER_STYLE
    from train import stepper, trainers  # bench/train.py

    from cellssl.engine.flops import matmul_peak

    benchmark.group = f"train: {name}"
    if impl == "paper-style" and name not in PAPER_STYLE:
        pytest.skip(f"no paper-style step for {name}: the reference's GP→TF branch cannot run as written")
    built = trainers(name, str(store.path), size["batch"])
    trainer = built["csr" if impl == "ours" else "paper"]
    step = stepper(trainer)
    extra = {}
    if impl == "ours":  # the ceiling: the dense network's FLOPs at this machine's matmul rate
        extra["ceiling_cells_per_s"] = matmul_peak(trainer.device) / trainer.flops_per_cell
    record(benchmark, "ours" if impl == "ours" else "baseline (paper-style)", size["batch"],
           reference=impl == "paper-style", **extra)
    benchmark.pedantic(step, rounds=size["steps"], warmup_rounds=1)


# --- loaders: ours (dense and CSR batches) vs the ceiling and the peers ------------------------------------------
def _scatter_ceiling(store, batch: int):
    """Zero the batch buffer and scatter already-decoded rows into it: no decoding, no I/O, no bookkeeping."""
    start, stop = store.split("train")
    indptr, indices, data = store.read_rows(start, start + batch)
    rows = np.repeat(np.arange(batch), np.diff(indptr))
    flat_index = rows * store.n_genes + indices.astype(np.int64)
    values = data.astype(np.float32)
    out = np.empty(batch * store.n_genes, np.float32)

    def run():
        out.fill(0.0)
        out[flat_index] = values
    return run


@pytest.mark.parametrize("loader", ["ours-dense", "ours-csr", "ceiling"])
def test_loader(benchmark, store, size, loader):
    benchmark.group = "loader"
    batch = size["batch"]
    if loader == "ceiling":
        fn = _scatter_ceiling(store, batch)
    else:
        stream = BatchStream(store, "train", batch, seed=0, columns=[],
                             output="csr" if loader == "ours-csr" else "dense").endless()
        next(stream)
        fn = lambda: next(stream)  # noqa: E731
    record(benchmark, "ceiling" if loader == "ceiling" else "ours", batch)
    benchmark.pedantic(fn, rounds=size["loader_batches"], warmup_rounds=2)


def _python312() -> str | None:
    import glob

    candidates = [os.environ.get("PYTHON312"), *sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/3.1[2-9]*/bin/python"))), shutil.which("python3.12")]
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.mark.parametrize("peer", ["annbatch", "scdataset"])
def test_loader_peer(benchmark, store, size, data_dir, peer):
    """Peers in their own process (annbatch needs Python ≥ 3.12), on the same cells, reporting their cells/s."""
    benchmark.group = "loader"
    from loader import ANNBATCH_SCRIPT, child, export_h5ad  # bench/loader.py

    h5ad = data_dir / f"bench-{size['store_cells']}.h5ad"
    if peer == "scdataset" and importlib.util.find_spec("scdataset") is None:
        pytest.skip('scDataset is not installed: pip install "cellssl[bench]"')
    if peer == "annbatch" and _python312() is None:
        pytest.skip("annbatch needs Python ≥ 3.12: install one (pyenv install 3.12) or set PYTHON312")
    if not h5ad.exists():
        export_h5ad(store, h5ad)
    if peer == "annbatch":
        from loader import annbatch_env

        python = annbatch_env(data_dir)
        collection = data_dir / f"bench-{size['store_cells']}.annbatch.zarr"
        if not (collection / "zarr.json").exists():
            subprocess.run([str(python), "-c", ANNBATCH_SCRIPT, str(h5ad), str(collection), "0", "build"], check=True)
        script = ANNBATCH_SCRIPT.replace("batch_size=8192", f"batch_size={size['batch']}").replace(
            "it = iter(loader)", "def _epochs():\n    while True:\n        yield from loader\nit = _epochs()")
        cmd = [str(python), "-c", script, str(h5ad), str(collection), str(size["loader_batches"]), "run"]
        result = {}

        def run():
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    else:
        result = {}

        def run():
            result.update(child("scdataset", {"h5ad": h5ad}, size["loader_batches"]))
    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, "peer", size["batch"], reference=peer == "annbatch", cells_per_s=result["cells_per_s"],
           peak_rss_mb=result.get("peak_rss_mb"))


# --- resident shards: ours vs what users with the data in memory do today --------------------------------------
@pytest.mark.parametrize("loader", ["resident-csr", "scipy-rows", "resident-dense", "scipy-rows-dense"])
def test_resident(benchmark, store, size, loader):
    """The train split held in RAM, raw counts, a uniform permutation per epoch: our resident stream vs scipy's
    `X[rows]` (and `.toarray()`). `load_s`: reading the split into memory."""
    import time

    batch, dense = size["batch"], loader.endswith("dense")
    benchmark.group = f"resident: {'dense' if dense else 'CSR'} batches of raw counts"
    t0 = time.perf_counter()
    if loader.startswith("resident"):
        stream = BatchStream(store, "train", batch, seed=0, columns=[], normalize=False, resident="host",
                             output="dense" if dense else "csr")
        stream.load_share()
        batches = stream.endless()
    else:
        x = store.to_scipy(*store.split("train"))
        rng = np.random.default_rng(0)

        def scipy_batches():
            while True:
                order = rng.permutation(x.shape[0])
                for s in range(0, len(order) - batch + 1, batch):
                    rows = x[order[s:s + batch]]
                    yield rows.toarray() if dense else rows
        batches = scipy_batches()
    load_s = time.perf_counter() - t0
    next(batches)
    record(benchmark, "ours" if loader.startswith("resident") else "baseline", batch,
           reference=loader.startswith("scipy"), load_s=load_s)
    benchmark.pedantic(lambda: next(batches), rounds=size["loader_batches"], warmup_rounds=2)


# --- conversion: the published scTab layout, 1, 2 and `auto` worker processes, beside one process's decode bound ---
def _sctab_source(size, data_dir):
    from cellssl.loaders.synth import synth

    src = data_dir / f"sctab-{size['convert_cells']}"
    if not (src / "var.parquet").exists():
        synth(src, size["convert_cells"], "sctab-parquet", overwrite=True, progress=False)
    return src


def test_convert_decode_bound(benchmark, size, data_dir, tmp_path):
    """What one process does at best: decode every part file and extract its nonzeros (the source reader alone,
    nothing shuffled, written or verified)."""
    from cellssl.loaders.convert import open_source

    benchmark.group = "convert"
    source = open_source("sctab", _sctab_source(size, data_dir))

    def run():
        for _ in source.chunks(tmp_path):
            pass

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, "ceiling", size["convert_cells"], label="decode + extract the nonzeros, one process")


@pytest.mark.parametrize("workers", [1, 2, "auto"])
def test_convert_sctab(benchmark, size, data_dir, workers):
    from cellssl.loaders.convert import convert, open_source
    from cellssl.loaders.workers import cores

    benchmark.group = "convert"
    n = size["convert_cells"]
    src = _sctab_source(size, data_dir)
    dst = data_dir / f"sctab-{n}-w{workers}.cellstore"

    def run():
        convert(open_source("sctab", src), dst, overwrite=True, progress=False,
                workers=cores() if workers == "auto" else workers,
                log=lambda msg: None)

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, f"ours, {workers} worker{'s' if workers != 1 else ''}", n, reference=workers == 1)
    shutil.rmtree(dst)
