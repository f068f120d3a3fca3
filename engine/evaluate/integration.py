"""Data integration: the scIB batch-correction and bio-conservation metrics and their weighted total
(0.4 · batch + 0.6 · bio), computed by the community library `scib-metrics` (the `eval` extra), never re-implemented
here. Embeddings of the same cells are compared side by side; PCA of the expression is the unintegrated
reference the library's PCR comparison needs. Their neighbour graphs are exact (evaluate/neighbours.py, on the device
when there is one) instead of the library's default approximate pynndescent, whose numba compilation alone took a
minute of a small evaluation."""
from __future__ import annotations

import contextlib
import gc

import numpy as np
import pandas as pd

from cellssl.loaders import InputError

from . import compile_cache


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("scib_metrics") is not None


def _exact_neighbours(x: np.ndarray, k: int):
    """scib-metrics' neighbour results from our exact kNN, each cell first (as pynndescent returns them)."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    from .neighbours import self_first

    indices, distances = self_first(x, k)
    return NeighborsResults(indices=indices, distances=distances)


def _exact_diffusion_neighbours():
    """kBET per label finds neighbours in a diffusion map through `scib_metrics.nearest_neighbors.pynndescent` and
    offers no hook; for the call it is our exact kNN instead (exact neighbours, and no minute of numba compilation
    for a few thousand cells). Where a scib-metrics release moves it, its own search runs."""
    from unittest import mock

    import scib_metrics.nearest_neighbors as found

    if not hasattr(found, "pynndescent"):
        return contextlib.nullcontext()
    return mock.patch.object(found, "pynndescent", lambda x, n_neighbors, **_: _exact_neighbours(x, n_neighbors))


@contextlib.contextmanager
def _frozen_heap():
    """The objects alive before the metrics kept out of Python's garbage collections meanwhile (`gc.freeze`):
    scib-metrics collects after each metric and representation, and with torch, jax and the evaluation's own
    objects alive each collection took ~0.5 s — 18 s of a small evaluation's integration, none of it garbage."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def scib_scores(embeddings: dict[str, np.ndarray], batch: np.ndarray, labels: np.ndarray, unintegrated: np.ndarray,
                max_cells: int = 10_000, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """{embedding name: {metric: value, …, "batch_correction", "bio_conservation", "total"}} on the same cells
    (a seeded subsample of at most `max_cells`; unlabelled cells are left out)."""
    try:
        from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    except ImportError as exc:
        raise InputError("scib-metrics", f"the integration metrics need it ({exc})",
                         'pip install "cellssl[eval]" (or skip the task with --tasks)') from None
    import logging

    import anndata as ad

    compile_cache.jax_programs()
    compile_cache.numba_functions()

    logging.getLogger("scib_metrics").setLevel(logging.WARNING)  # one INFO line per small batch otherwise

    n = len(batch)
    for name, z in {**embeddings, "unintegrated": unintegrated}.items():
        if len(z) != n or len(labels) != n:
            raise ValueError(f"integration: {name} has {len(z):,} cells, the batch labels {n:,}, the cell-type "
                             f"labels {len(labels):,}; they must be the same cells")
    keep = np.flatnonzero((labels >= 0) & (batch >= 0))
    if len(np.unique(batch[keep])) < 2:
        raise InputError("batch column", "the integration metrics need cells from at least two batches",
                         "choose a --batch column with several values (dataset, donor, assay)")
    if len(keep) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_cells, replace=False))
    obs = pd.DataFrame({"batch": pd.Categorical(batch[keep].astype(str)),
                        "label": pd.Categorical(labels[keep].astype(str))}, index=[str(i) for i in keep])
    adata = ad.AnnData(X=np.zeros((len(keep), 1), np.float32), obs=obs,
                       obsm={**{k: np.ascontiguousarray(v[keep], np.float32) for k, v in embeddings.items()},
                             "X_unintegrated": np.ascontiguousarray(unintegrated[keep], np.float32)})
    bench = Benchmarker(adata, "batch", "label", list(embeddings), bio_conservation_metrics=BioConservation(),
                        batch_correction_metrics=BatchCorrection(),
                        pre_integrated_embedding_obsm_key="X_unintegrated", n_jobs=2, progress_bar=progress)
    bench.prepare(neighbor_computer=_exact_neighbours)
    with _exact_diffusion_neighbours(), _frozen_heap():
        bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    table = table.drop(index="Metric Type", errors="ignore")
    out = {}
    for name in embeddings:
        row = {str(k).lower().replace(" ", "_"): float(v) for k, v in table.loc[name].items()}
        out[name] = row
    return out
