"""Evaluation in bounded memory: the streamed randomized PCA against scikit-learn's exact PCA, and the blocked exact
kNN against scikit-learn's brute force, at small sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cellssl.engine.evaluate.pca import StreamedPCA
from cellssl.loaders import CellStore
from cellssl.loaders.densify import log1p_per_10k


def _whole_split(store: CellStore, split: str):
    """The split in memory, as the old baseline read it: the reference to compare with."""
    start, stop = store.split(split)
    x = store.to_scipy(start, stop).astype(np.float32)
    x.data = log1p_per_10k(x.indptr, x.data)
    return x


def test_streamed_pca_matches_scikit_learn(synthetic_store):
    from sklearn.decomposition import PCA

    store = CellStore(synthetic_store)
    x = _whole_split(store, "train")
    exact = PCA(20, svd_solver="arpack", random_state=0).fit(x)
    ours = StreamedPCA(20, seed=0).fit(store, "train")
    np.testing.assert_allclose(ours.mean_, np.asarray(x.mean(0)).ravel(), rtol=1e-5, atol=1e-6)
    # explained variance: the leading components to 0.1 %, all 20 to 2 %
    np.testing.assert_allclose(ours.explained_variance_[:10], exact.explained_variance_[:10], rtol=1e-3)
    np.testing.assert_allclose(ours.explained_variance_, exact.explained_variance_, rtol=2e-2)
    np.testing.assert_allclose(ours.explained_variance_ratio_, exact.explained_variance_ratio_, rtol=2e-2)
    # the subspace of the leading 10: every principal angle's cosine above 0.999
    cosines = np.linalg.svd(ours.components_[:10] @ exact.components_[:10].T, compute_uv=False)
    assert cosines.min() > 0.999, cosines
    z, ref = ours.transform(store, "test"), exact.transform(_whole_split(store, "test"))
    for j in range(5):  # the same coordinates on the leading components (signs as svd_flip sets them)
        assert abs(np.corrcoef(z[:, j], ref[:, j])[0, 1]) > 0.999


def test_streamed_pca_refuses_a_split_too_small(synthetic_store, monkeypatch):
    from cellssl.engine.evaluate import pca

    store = CellStore(synthetic_store)
    monkeypatch.setattr(pca, "_batches", lambda store, split: iter([]))
    with pytest.raises(ValueError, match="at least 2 cells"):
        StreamedPCA(5).fit(store, "train")


@pytest.mark.parametrize("block", [7, 4096])
def test_blocked_knn_finds_what_scikit_learn_finds(block):
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    from cellssl.engine.evaluate.neighbours import nearest, vote

    rng = np.random.default_rng(0)
    ref, query = rng.standard_normal((300, 8)).astype(np.float32), rng.standard_normal((50, 8)).astype(np.float32)
    ref[7] = ref[3]  # a tie: the lower index first
    query[0] = ref[3] + 1e-3
    ours = nearest(ref, query, 6, block=block)
    same, far = nearest(ref, query, 6, block=block, distances=True)
    assert np.array_equal(same, ours)
    theirs = NearestNeighbors(n_neighbors=6, algorithm="brute").fit(ref).kneighbors(query, return_distance=False)
    # the same neighbours at the same distances; scikit-learn leaves the order of equal distances to argpartition,
    # ours puts the lower index first
    dist = lambda found: np.linalg.norm(ref[found] - query[:, None].astype(np.float64), axis=2)  # noqa: E731
    np.testing.assert_allclose(dist(ours), dist(theirs), rtol=1e-12)
    assert list(ours[0, :2]) == [3, 7]
    labels = rng.integers(0, 4, 300)
    expected = KNeighborsClassifier(n_neighbors=6).fit(ref, labels).predict(query)
    assert np.array_equal(vote(labels, ours, 4), expected)
    with pytest.raises(ValueError, match="k must be in"):
        nearest(ref, query, 301)
    np.testing.assert_allclose(far, dist(ours), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("block,query_block", [(64, 16), (50, 7), (4096, 2048)])
def test_blocked_knn_keeps_the_lower_index_among_ties_past_the_slack(block, query_block):
    """Each block is cut to its k + 8 nearest by a selection; where more than that tie at the k-th distance (20
    duplicate cells), the row is merged whole: the same neighbours as a stable sort of every distance."""
    from cellssl.engine.evaluate.neighbours import nearest

    rng = np.random.default_rng(1)
    ref = rng.integers(0, 3, (300, 4)).astype(np.float32)  # few distinct points: ties everywhere
    ref[100:120] = ref[5]
    query = np.concatenate([ref[[5, 0, 299]], rng.integers(0, 3, (40, 4)).astype(np.float32)])
    d = ((query[:, None].astype(np.float64) - ref[None]) ** 2).sum(2)
    expected = np.argsort(d, axis=1, kind="stable")[:, :6]
    found, far = nearest(ref, query, 6, block=block, query_block=query_block, distances=True)
    assert np.array_equal(found, expected)
    np.testing.assert_allclose(far, np.sqrt(np.take_along_axis(d, expected, 1)), atol=1e-9)


def test_the_float32_screen_never_changes_the_neighbours(monkeypatch):
    """Distances are screened in float32; where two cells differ by less than float32 can tell (1e-9 apart, far from
    the origin), the float64 re-screen and the whole-block measure decide: the neighbours and distances of float64
    brute force, every tier used."""
    from cellssl.engine.evaluate import neighbours

    rng = np.random.default_rng(2)
    offset = 1000.0
    query = offset + rng.standard_normal((30, 8))
    ref = np.repeat(query[:10], 40, axis=0)  # 40 cells around each of the first 10 queries, 1 + j·1e-9 away
    direction = rng.standard_normal(ref.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    ref = ref + direction * np.sqrt(1 + 1e-9 * rng.permutation(len(ref)))[:, None]
    ref = np.concatenate([ref, offset + rng.standard_normal((200, 8))])
    ref[440:470] = ref[5]  # exact duplicates, more than the cut keeps: ties to the lower index
    query[29] = ref[5]
    tiers = {"float64": 0, "whole": 0}
    cut, whole = neighbours._cut, neighbours._whole
    monkeypatch.setattr(neighbours, "_cut", lambda d, *a: (tiers.__setitem__("float64", tiers["float64"] + (
        d.dtype == torch.float64)), cut(d, *a))[1])
    monkeypatch.setattr(neighbours, "_whole", lambda *a: (tiers.__setitem__("whole", tiers["whole"] + 1),
                                                          whole(*a))[1])
    exact = ((query[:, None] - ref[None]) ** 2).sum(2)
    for k, block in [(5, 64), (12, 4096)]:
        found, far = neighbours.nearest(ref, query, k, block=block, distances=True)
        expected = np.argsort(exact, axis=1, kind="stable")[:, :k]
        np.testing.assert_allclose(far, np.sqrt(np.take_along_axis(exact, expected, 1)), rtol=1e-12)
        assert np.array_equal(found, expected)
    assert tiers["float64"] and tiers["whole"], tiers


@pytest.mark.parametrize("max_cells", [10**6, 1500])
def test_blocked_lbfgs_probe_scores_as_scikit_learn_does(max_cells):
    """The probe without scikit-learn's copies of the train split: the same objective, the same predictions (up to
    the optimiser's stopping point), in blocks smaller than the split; a subsample where the split is too large."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cellssl.engine.evaluate.celltype import linear_probe

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, 16)) * 0.5
    y, y_test = rng.integers(0, 12, 3000), rng.integers(0, 12, 1000)
    y[:5] = 11  # a rare class
    z = (centres[y] + rng.standard_normal((3000, 16))).astype(np.float32)
    z_test = (centres[y_test] + rng.standard_normal((1000, 16))).astype(np.float32)
    z[:, 15] = z_test[:, 15] = 2.0  # a constant column: StandardScaler leaves it unscaled
    ours = linear_probe(z, y, z_test, y_test, max_cells=max_cells, block=700)
    assert ours["fitted_on"] == min(3000, max_cells)
    keep = slice(None) if max_cells > 3000 else np.sort(np.random.default_rng(0).choice(3000, max_cells, False))
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(z[keep], y[keep])
    theirs = f1_score(y_test, reference.predict(z_test), average="macro")
    assert abs(ours["macro_f1"] - theirs) < 0.01, (ours["macro_f1"], theirs)


def test_fine_tuning_in_micro_batches_trains_the_one_batch_model(synthetic_store, tmp_path, monkeypatch):
    """The evaluation's fine-tuning passes its batch in micro-batches (memory follows MICRO_BATCH, not the 16,384-cell
    batch) and validates the whole validation split in chunks of that size: the same steps, validation losses and
    weights as one batch and one validation pass."""
    import json

    from safetensors.torch import load_file

    from cellssl.engine.evaluate import celltype

    store = CellStore(synthetic_store)
    runs = {}
    for micro in (4096, 64):
        monkeypatch.setattr(celltype, "MICRO_BATCH", micro)
        runs[micro] = celltype.finetune(store, "cell_type", tmp_path / str(micro), None, 3, batch_size=256).parent
    whole, parts = runs[4096], runs[64]
    cfg = json.loads((parts / "config.json").read_text())
    assert (cfg["batch_size"], cfg["gradient_accumulation"], cfg["val_batch_size"], cfg["val_batches"]) == (64, 4, 64, 0)
    assert json.loads((whole / "config.json").read_text())["gradient_accumulation"] == 1

    def log(run):
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    def scores(run, key):
        return [r[key] for r in log(run) if key in r]

    np.testing.assert_allclose(scores(parts, "loss"), scores(whole, "loss"), rtol=1e-5)
    np.testing.assert_allclose(scores(parts, "val_loss"), scores(whole, "val_loss"), rtol=1e-5)
    a, b = load_file(str(whole / "model-last.safetensors")), load_file(str(parts / "model-last.safetensors"))
    for key in a:
        assert float((a[key] - b[key]).norm() / a[key].norm().clamp(min=1e-12)) < 1e-4, key


def test_validation_covers_the_split_in_chunks_of_its_own_size(synthetic_store):
    """--val-batches 0 validates the whole split; --val-batch-size cuts the same cells into other chunks, each rank a
    slice of every chunk."""
    from cellssl.engine.config import TrainConfig
    from cellssl.engine.validation import validation_sampler

    store = CellStore(synthetic_store)
    start, stop = store.split("val")

    def cells(world, **kw):
        cfg = TrainConfig(batch_size=64, **kw)
        samplers = [validation_sampler(store, cfg, rank, world)[0] for rank in range(world)]
        return [[rows for _, rows in s.batches(0)] for s in samplers]

    whole = cells(1, val_batches=0)
    assert sorted(np.concatenate([np.asarray(b) for b in whole[0]]).tolist()) == list(range(start, stop))
    assert max(len(b) for b in whole[0]) == 64
    chunked = cells(2, val_batches=0, val_batch_size=16)
    assert max(len(b) for b in chunked[0]) == 16
    seen = np.concatenate([np.asarray(b) for rank in chunked for b in rank])
    assert sorted(seen.tolist()) == list(range(start, stop))
    first = cells(1, val_batches=2)  # two global batches of 64
    assert sum(len(b) for b in first[0]) == 128
