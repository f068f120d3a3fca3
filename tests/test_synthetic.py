"""The synthetic atlas looks like 10x data and carries recoverable truth."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cellssl.loaders import CellStore
from cellssl.loaders.genes import GeneSpace
from cellssl.loaders.genesets import index_programmes, read_gmt
from cellssl.loaders.synthetic import SyntheticAtlas, SyntheticConfig, default_store


def test_store_shape_and_realism(synthetic_store):
    store = CellStore(synthetic_store, validate="full")
    assert store.n_genes == 19350 and store.value_kind == "counts"
    x = store.to_scipy()
    detected = np.diff(x.indptr)
    assert 1500 <= np.median(detected) <= 2500
    library = np.asarray(x.sum(axis=1)).ravel()
    assert 2000 <= np.median(library) <= 10000
    freq = store.obs()["cell_type"].value_counts()
    assert len(store.categories["cell_type"]) >= 30
    assert freq.iloc[0] / max(freq.iloc[-1], 1) > 20  # strongly imbalanced
    assert store.obs()["dataset_id"].nunique() >= 10


def test_same_seed_same_atlas():
    atlas = SyntheticAtlas(SyntheticConfig(seed=7), GeneSpace.default())
    a = [c[:3] for c in atlas.cells(3000, chunk_cells=1000)]
    b = [c[:3] for c in SyntheticAtlas(SyntheticConfig(seed=7), GeneSpace.default()).cells(3000, chunk_cells=1000)]
    for (ia, xa, va), (ib, xb, vb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(va, vb)


def test_held_out_datasets_and_a_second_draw_share_the_atlas():
    import pytest

    genes = GeneSpace.default()
    base = SyntheticAtlas(SyntheticConfig(), genes)
    target = SyntheticAtlas(SyntheticConfig(datasets=(10, 11), draw=1), genes)
    np.testing.assert_array_equal(base.type_profile, target.type_profile)  # same types, genes and batch effects
    first, held = next(base.cells(500)), next(target.cells(500))
    assert set(np.unique(held[3]["dataset_id"])) == {10, 11}
    assert set(np.unique(first[3]["dataset_id"])) == set(range(12))
    again = next(SyntheticAtlas(SyntheticConfig(draw=1), genes).cells(500))
    assert not np.array_equal(again[0], first[0])  # another draw: other cells
    with pytest.raises(ValueError, match="subset of 0…11"):
        SyntheticAtlas(SyntheticConfig(datasets=(12,)), genes)


def test_nb_sampler_moments():
    from cellssl.loaders.synthetic import NB_THETA, sample_nb

    rng = np.random.default_rng(0)
    means = np.array([0.01, 0.1, 0.29, 0.5, 3.0, 40.0], np.float32)
    mean = np.tile(means, (100_000, 1))
    indptr, indices, vals = sample_nb(rng, mean)
    dense = np.zeros(mean.shape)
    dense[np.repeat(np.arange(len(mean)), np.diff(indptr)), indices] = vals
    np.testing.assert_allclose(dense.mean(0), means, rtol=0.03)
    expected_var = means + np.where(means >= 0.3, means ** 2 / NB_THETA, 0)
    np.testing.assert_allclose(dense.var(0), expected_var, rtol=0.05)


def test_planted_tf_programmes_are_recoverable(synthetic_store):
    store = CellStore(synthetic_store)
    x = store.to_scipy().toarray().astype(np.float64)
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    sets = read_gmt(synthetic_store / "synthetic_truth" / "tf_targets.gmt")
    index = index_programmes(sets, store.genes)
    tf_cols = [int(np.flatnonzero(store.genes.gene_id == s.description)[0]) for s in sets]
    cors = []
    rng = np.random.default_rng(0)
    for tf, targets in zip(tf_cols, index.members):
        cors.append(np.corrcoef(x[:, tf], x[:, targets].mean(1))[0, 1])
        random_set = rng.choice(store.n_genes, len(targets), replace=False)
        cors[-1] -= np.corrcoef(x[:, tf], x[:, random_set].mean(1))[0, 1]
    assert np.median(cors) > 0.1


def test_proteins_follow_their_genes(synthetic_store):
    store = CellStore(synthetic_store)
    proteins = pd.read_csv(synthetic_store / "synthetic_truth" / "proteins.tsv", sep="\t")
    obs = store.obs()
    x = store.to_scipy()
    lib = np.asarray(x.sum(1)).ravel()
    cors = []
    for _, row in proteins.iterrows():
        col = int(np.flatnonzero(store.genes.gene_id == row.gene_id)[0])
        gene = np.log1p(x[:, col].toarray().ravel() / lib * 1e4)
        cors.append(np.corrcoef(gene, obs[row.protein])[0, 1])
    assert np.median(cors) > 0.4


def test_default_store_built_once(tmp_path, monkeypatch):
    import cellssl.loaders.synthetic as synthetic

    monkeypatch.setenv("CELLSSL_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEFAULT_CELLS", 400)
    path = default_store(progress=False)
    assert path.parent == tmp_path and CellStore(path).n_cells == 400
    mtime = (path / "zarr.json").stat().st_mtime
    assert default_store(progress=False) == path and (path / "zarr.json").stat().st_mtime == mtime


def test_the_h5ad_form_carries_the_planted_truth(tmp_path, synthetic_store):
    import anndata as ad

    from cellssl.loaders.synth import synth

    path = synth(tmp_path / "a.h5ad", 200, "h5ad", progress=False)
    truth = ad.read_h5ad(path, backed="r").uns["synthetic_truth"]
    stored = synthetic_store / "synthetic_truth"
    assert set(truth) == {p.name for p in stored.iterdir()}
    assert truth["tf_targets.gmt"] == (stored / "tf_targets.gmt").read_text()
