"""Evaluators on cases with known answers, their input checks, and `cellssl eval` end to end on a small store."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_trainer import recipe_args, run

from cellssl.engine.evaluate import celltype, crossmodal
from cellssl.engine.evaluate.inputs import labels, modality, modality_columns, split_range
from cellssl.engine.evaluate.reconstruction import reconstruction_scores
from cellssl.engine.evaluate.representations import PCARepresentation
from cellssl.loaders import CellStore, InputError


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """1,200 synthetic cells in a 2,000-gene space: every evaluator runs in seconds."""
    from cellssl.loaders import GeneSpace
    from cellssl.loaders.synth import synth

    folder = tmp_path_factory.mktemp("eval")
    (folder / "genes.txt").write_text("\n".join(GeneSpace.default().gene_id[:2000]))
    return synth(folder / "small.cellstore", 1200, genes=folder / "genes.txt", progress=False, test_frac=0.25)


def clusters(n, k, seed, spread=0.1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return np.eye(k)[y] * 5 + rng.normal(0, spread, (n, k)), y


def test_linear_probe_and_knn_on_separable_and_on_shuffled_labels():
    z_train, y_train = clusters(400, 4, 0)
    z_test, y_test = clusters(200, 4, 1)
    assert celltype.linear_probe(z_train, y_train, z_test, y_test)["macro_f1"] == 1.0
    assert celltype.knn(z_train, y_train, z_test, y_test)["macro_f1"] == 1.0
    shuffled = np.random.default_rng(2).permutation(y_train)
    assert celltype.knn(z_train, shuffled, z_test, y_test)["macro_f1"] < 0.45


def test_paper_knn_drops_the_nearest_validation_cell_and_votes_the_next_k():
    # each test cell sits on a validation cell of the wrong type; its next 5 neighbours are of its own type
    z_test = np.arange(6, dtype=float)[:, None] * 100
    y_test = np.arange(6) % 2
    z_val = np.concatenate([z_test + 0.01, *(z_test + 1 + i for i in range(5))])
    y_val = np.concatenate([1 - y_test, *([y_test] * 5)])
    assert celltype.paper_knn(z_val, y_val, z_test, y_test)["macro_f1"] == 1.0
    assert celltype.knn(z_val, y_val, z_test, y_test, k=1)["macro_f1"] == 0.0  # the neighbour it drops
    # a tie among the k votes goes to the lowest code, as numpy's bincount-argmax
    votes = celltype.paper_knn(np.array([[0.0], [1], [2], [3], [4]]), np.array([9, 2, 1, 2, 1]),
                               np.array([[0.0]]), np.array([1]), k=4)
    assert votes["macro_f1"] == 1.0


def test_hierarchy_correction_counts_a_predicted_child_as_the_true_type():
    children = [[1, 2], [2], []]  # 0 → 1 → 2
    y_true, y_pred = np.array([0, 0, 1, 2, 2]), np.array([1, 2, 2, 0, 1])
    assert celltype.hierarchy_corrected(y_true, y_pred, children).tolist() == [0, 0, 1, 0, 1]  # parents stay wrong
    assert celltype.hierarchy_corrected(y_true, y_pred, None).tolist() == y_pred.tolist()
    z = np.array([[0.0], [0.1], [0.2], [10], [10.1], [10.2]])
    scores = celltype.paper_knn(z, np.array([1, 1, 1, 2, 2, 2]), np.array([[0.05], [10.05]]), np.array([0, 1]), k=2,
                                children=children)
    assert scores["macro_f1"] == 1.0 and scores["hierarchy_corrected"]


def test_unlabelled_cells_are_left_out_and_mismatches_refused():
    z, y = clusters(300, 3, 0)
    y_gaps = y.copy()
    y_gaps[::3] = -1
    assert celltype.knn(z, y_gaps, z, y_gaps)["support"] == {str(c): int(((y_gaps == c)).sum()) for c in range(3)}
    with pytest.raises(ValueError, match="300 embeddings but 299 labels"):
        celltype.linear_probe(z, y[:-1], z, y)


def test_frozen_cross_modal_head_recovers_a_linear_modality():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1200, 16)).astype(np.float32)
    y = z @ rng.normal(size=(16, 5)) + 3.0
    got = crossmodal.frozen(z[:1000], y[:1000], z[1000:], y[1000:], list("abcde"), epochs=60)
    assert got["pearson_per_feature"] > 0.95 and got["pearson_per_cell"] > 0.9
    noise = crossmodal.frozen(z[:1000], rng.normal(size=(1000, 5)), z[1000:], y[1000:], list("abcde"), epochs=5)
    assert abs(noise["pearson_per_feature"]) < 0.2
    with pytest.raises(ValueError, match="paired measurements"):
        crossmodal.frozen(z[:1000], y[:999], z[1000:], y[1000:], list("abcde"))


def test_reconstruction_identity_explains_everything_but_not_masked_genes(small_store):
    store = CellStore(small_store)
    identity = reconstruction_scores(lambda x: x, store, "test")
    assert identity["variance_weighted"] == pytest.approx(1.0)
    masked = reconstruction_scores(lambda x: x, store, "test", mask_rate=0.5)
    assert masked["variance_weighted"] < 0.05        # masked inputs are zero: nothing of them is reconstructed
    assert masked["n_values"] == pytest.approx(identity["n_values"] / 2, rel=0.02)


def test_pca_baseline_embeds_and_reconstructs(small_store):
    store = CellStore(small_store)
    pca = PCARepresentation(store)
    z = pca.embed(store, "test")
    assert z.shape == (split_range(store, "test")[1] - split_range(store, "test")[0], 50)
    ev = reconstruction_scores(pca.reconstructor, store, "test")["variance_weighted"]
    assert 0.0 < ev < 1.0
    # the reference's form: the mean of per-batch scores; one batch holding the whole split is the split's score
    start, stop = split_range(store, "test")
    batches = reconstruction_scores(pca.reconstructor, store, "test", batch_size=(stop - start) // 3 + 1)
    assert batches["batches"] == 3 and batches["variance_weighted"] == pytest.approx(ev)
    assert batches["per_batch_mean"] != pytest.approx(ev)
    whole = reconstruction_scores(pca.reconstructor, store, "test", batch_size=stop - start)
    assert whole["batches"] == 1 and whole["per_batch_mean"] == pytest.approx(ev)


def test_store_inputs_are_checked(small_store):
    store = CellStore(small_store)
    with pytest.raises(InputError, match="obs.parquet: no column 'celltype'.*choose --label from"):
        labels(store, "celltype", "test")
    with pytest.raises(InputError, match="'protein_.*' is not categorical"):
        labels(store, modality_columns(store)[0], "test")
    with pytest.raises(InputError, match="no 'holdout' split"):
        labels(store, "cell_type", "holdout")
    assert len(modality_columns(store)) == 32
    with pytest.raises(InputError, match="categorical, not measurements"):
        modality_columns(store, ["cell_type"])
    with pytest.raises(InputError, match="no paired-modality columns"):
        modality_columns(store, prefix="atac_")
    assert modality(store, modality_columns(store), "test").dtype == np.float32


def test_integration_refuses_mismatched_cells():
    from cellssl.engine.evaluate.integration import scib_scores

    with pytest.raises(ValueError, match="must be the same cells"):
        scib_scores({"m": np.zeros((10, 4))}, np.zeros(9, int), np.zeros(9, int), np.zeros((9, 4)))


def test_integration_neighbours_are_exact_and_never_pynndescent(monkeypatch):
    """scib-metrics' neighbour graphs (its prepare step and kBET's diffusion-map search) come from our exact kNN:
    pynndescent's numba compilation took a minute of a small evaluation."""
    import pynndescent
    import umap.umap_  # noqa: F401  (imported before the patch: it keeps pynndescent's class for isinstance)

    from cellssl.engine.evaluate.integration import _exact_neighbours, scib_scores

    def refuse(*a, **k):
        raise AssertionError("pynndescent was called")

    monkeypatch.setattr(pynndescent, "NNDescent", refuse)
    monkeypatch.setattr(pynndescent.pynndescent_, "NNDescent", refuse)
    # scib-metrics collects garbage after every metric: the objects alive before are frozen meanwhile (each
    # collection through torch's and jax's objects took ~0.5 s), and unfrozen after
    frozen, collect = [], gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: (frozen.append(gc.get_freeze_count()), collect(*a))[1])
    rng = np.random.default_rng(0)
    labels, batch = rng.integers(0, 3, 240), rng.integers(0, 2, 240)
    z = rng.standard_normal((240, 8)) + labels[:, None] * 3.0
    scores = scib_scores({"m": z}, batch, labels, z, progress=False)["m"]
    assert 0 <= scores["total"] <= 1 and np.isfinite(scores["kbet"])
    assert sum(f > 1000 for f in frozen) >= 9 and gc.get_freeze_count() == 0  # prepare's own collect: not frozen
    z[7] = z[3]  # a duplicate: each is still its own first neighbour
    found = _exact_neighbours(z.astype(np.float32), 5)
    assert (found.indices[:, 0] == np.arange(240)).all() and (found.distances[:, 0] == 0).all()
    assert found.indices[7, 1] == 3 and found.indices[3, 1] == 7


def test_the_plots_use_our_exact_neighbours_not_umaps_search(tmp_path, monkeypatch):
    import umap.umap_

    from cellssl.engine.evaluate import report

    def refuse(*a, **k):
        raise AssertionError("umap searched for neighbours itself")

    monkeypatch.setattr(umap.umap_, "nearest_neighbors", refuse)
    z, y = clusters(300, 3, 0)
    written = report.plots({}, {"m": z}, y, ["a", "b", "c"], None, tmp_path)
    assert [p.split("/")[-1] for p in written] == ["umap_m.png"]


COMPILED_TWICE = """
import numpy as np
from scipy.sparse import coo_matrix
from cellssl.engine.evaluate import compile_cache
turned = compile_cache.numba_functions()
assert compile_cache.numba_functions() == 0  # idempotent
import umap.umap_ as u
k = np.stack([np.arange(50), (np.arange(50) + 1) % 50], 1)
u.fuzzy_simplicial_set(coo_matrix(([], ([], [])), shape=(50, 1)), 2, None, None, knn_indices=k,
                       knn_dists=np.array([[0.0, 1.0]] * 50, np.float32))
print(turned, u.smooth_knn_dist.stats.cache_hits.total())
"""


def test_umaps_uncached_functions_are_compiled_once_into_our_cache(tmp_path):
    """umap compiles its neighbour graph's parallel functions (also scib-metrics') in every process, uncached: ~6 s
    of a small evaluation; in $CELLSSL_CACHE/numba a second process loads them. A cache folder that cannot be made
    leaves them compiled as before."""
    env = {**os.environ, "CELLSSL_CACHE": str(tmp_path / "cache")}
    first, second = (subprocess.run([sys.executable, "-c", COMPILED_TWICE], env=env, capture_output=True, text=True,
                                    check=True).stdout.split() for _ in range(2))
    assert int(first[0]) >= 2 and first[1] == "0" and int(second[1]) >= 1
    assert any((tmp_path / "cache" / "numba").rglob("*smooth_knn_dist*.nbi"))
    (tmp_path / "file").write_text("")
    env["CELLSSL_CACHE"] = str(tmp_path / "file")  # not a folder
    done = subprocess.run([sys.executable, "-c", COMPILED_TWICE], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split()[0] == "0"


def test_cellssl_eval_end_to_end(small_store, tmp_path):
    model = tmp_path / "mae"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(small_store, model, 3)])
    out = tmp_path / "eval"
    run([sys.executable, "-m", "cellssl.engine.cli", "eval", f"mae={model / 'model.safetensors'}", "--data", str(small_store),
         "--out", str(out), "--finetune-steps", "3", "--crossmodal-steps", "3", "--batch-size", "256",
         "--integration-cells", "300"])
    results = json.loads((out / "results.json").read_text())
    names = {"mae", "PCA", "no pretraining"}
    assert set(results["representations"]) == names
    assert set(results["cell_type"]) == names
    assert set(results["cell_type"]["mae"]) == {"linear_probe", "knn", "paper_knn", "finetune"}
    assert np.isfinite(results["cell_type"]["mae"]["finetune"]["paper_knn"]["macro_f1"])
    assert not results["cell_type"]["mae"]["paper_knn"]["hierarchy_corrected"]  # a synthetic store: no hierarchy
    assert "finetune" not in results["cell_type"]["PCA"]
    assert set(results["reconstruction"]) == {"mae", "PCA"}
    assert set(results["reconstruction"]["mae"]) == {"all", "masked"}
    assert "finetuned" in results["cross_modality"]["no pretraining"]
    assert len(results["cross_modality"]["mae"]["frozen"]["per_feature"]) == 32
    for name in names:
        total = results["integration"][name]
        assert total["total"] == pytest.approx(0.4 * total["batch_correction"] + 0.6 * total["bio_conservation"])
    for value in (results["cell_type"]["mae"]["finetune"]["macro_f1"], results["reconstruction"]["PCA"]["all"][
            "variance_weighted"], results["cross_modality"]["PCA"]["frozen"]["pearson_per_feature"]):
        assert np.isfinite(value)
    table = (out / "results.md").read_text()
    assert "| mae |" in table and "PCA *(baseline)*" in table and "scIB total" in table and "paper kNN F1" in table
    assert "Per-class F1 on the test split" in table and ("| cell type | test cells | mae (fine-tuned) | PCA (linear "
                                                          "probe) | no pretraining (fine-tuned) |") in table
    assert {p.name for p in (out / "plots").iterdir()} == {"umap_mae.png", "umap_PCA.png",
                                                         "umap_no_pretraining.png", "per_class_f1.png"}


def test_cellssl_eval_bad_arguments_are_one_line_errors(small_store, tmp_path, capsys):
    from cellssl.engine.cli import main

    assert main(["eval", "--data", str(small_store), "--tasks", "cell_type,clustering", "--out", str(tmp_path)]) == 2
    assert "unknown task(s) ['clustering']" in capsys.readouterr().err
    assert main(["eval", "--data", str(small_store), "--label", "celltype", "--out", str(tmp_path)]) == 2
    assert "no column 'celltype'" in capsys.readouterr().err
    assert main(["eval", "--data", str(small_store), "--no-baselines", "--out", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "a=x/model.safetensors", "a=y/model.safetensors", "--data", str(small_store), "--out", str(tmp_path)]) == 2
    assert "two models are named 'a'" in capsys.readouterr().err


def test_integration_without_scib_metrics_is_refused_up_front_or_skipped(small_store, tmp_path, monkeypatch, capsys):
    from cellssl.engine.cli import main
    from cellssl.engine.evaluate import integration, suite

    monkeypatch.setattr(integration, "available", lambda: False)
    assert main(["eval", "--data", str(small_store), "--tasks", "integration", "--out", str(tmp_path)]) == 2
    assert 'scib-metrics: the integration task needs it. Fix: pip install "cellssl[eval]"' in capsys.readouterr().err
    monkeypatch.setattr(suite.celltype, "finetune", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("ran")))
    with pytest.raises(RuntimeError, match="ran"):  # default tasks: it goes on to the work (skipping integration)
        suite.evaluate(suite.EvalConfig(data=str(small_store), out=str(tmp_path)))


def test_a_child_matrix_can_be_passed_and_is_checked(small_store, tmp_path):
    from cellssl.engine.evaluate.suite import EvalConfig, hierarchy

    store = CellStore(small_store)
    n = len(store.categories["cell_type"])
    assert hierarchy(EvalConfig(data=str(small_store)), store) is None  # the synthetic store carries none
    matrix = np.zeros((n, n), np.int8)
    matrix[0, 1] = 1
    np.save(tmp_path / "children.npy", matrix)
    got = hierarchy(EvalConfig(data=str(small_store), child_matrix=str(tmp_path / "children.npy")), store)
    assert got[0] == [1] and got[1] == []
    np.save(tmp_path / "bad.npy", np.zeros((n, 2)))
    with pytest.raises(InputError, match=f"bad.npy: a \\({n}, 2\\) array.*Fix: pass a {n} × {n} child matrix"):
        hierarchy(EvalConfig(data=str(small_store), child_matrix=str(tmp_path / "bad.npy")), store)


def test_the_eta_counts_every_stage_once_where_it_runs(small_store, tmp_path, monkeypatch):
    """The stages announce exactly the work the estimate's total holds, each where the work runs: cross-modality per
    representation (announced once for the task, it was counted as done when the first representation started, and
    `cellssl eval` promised a minute while most of an hour of training was left)."""
    from cellssl.engine.evaluate import suite

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by the in-process
        monkeypatch.delenv(key, raising=False)  # fine-tuning below; restored (unset) after, for later subprocesses
    announced, totals = [], []
    real_init, real_stage = suite.Clock.__init__, suite.Clock.stage
    monkeypatch.setattr(suite.Clock, "__init__", lambda self, total: (totals.append(total), real_init(self, total))[1])
    monkeypatch.setattr(suite.Clock, "stage", lambda self, message, work=0.0: (announced.append((message, work)),
                                                                               real_stage(self, message, work))[1])
    suite.evaluate(suite.EvalConfig(data=str(small_store), out=str(tmp_path), tasks=("cell_type", "reconstruction",
                   "cross_modality"), finetune_steps=1, crossmodal_steps=1, batch_size=256, plots=False))
    assert sum(work for _, work in announced) == pytest.approx(totals[0])
    per_rep = {message: work for message, work in announced if message.startswith("cross-modality: ")}
    assert len(per_rep) == 2 and all(work > 0 for work in per_rep.values())  # PCA and the from-scratch baseline
    assert per_rep["cross-modality: no pretraining"] > per_rep["cross-modality: PCA"]  # it trains end to end
    assert dict(announced)["[3/3] cross modality"] == 0


def test_partial_results_resume_and_zero_step_budgets(small_store, tmp_path, capsys):
    """results.json is whole after each (task, representation) with what is missing; --resume does only the rest
    and keeps what was there; other settings are refused; --finetune-steps 0 and --crossmodal-steps 0 skip those
    parts, saying so."""
    from cellssl.engine.cli import main

    model = tmp_path / "mae"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(small_store, model, 2)])
    out = tmp_path / "eval"
    args = ["eval", f"mae={model}", "--data", str(small_store), "--out", str(out), "--tasks",
            "cell_type,reconstruction,cross_modality", "--finetune-steps", "0", "--crossmodal-steps", "0",
            "--no-plots"]
    assert main(args) == 0
    said = capsys.readouterr().err
    assert "--finetune-steps 0: no fine-tuning" in said
    assert "--crossmodal-steps 0: cross-modality heads on frozen embeddings only" in said
    first = json.loads((out / "results.json").read_text())
    assert first["missing"] == [] and set(first["representations"]) == {"mae", "PCA"}
    assert "finetune" not in first["cell_type"]["mae"] and "finetuned" not in first["cross_modality"]["mae"]
    assert "cross_modality_end_to_end" in first["skipped"]
    partial = {**json.loads(json.dumps(first)), "missing": ["cell_type: mae", "reconstruction: PCA"]}
    del partial["cell_type"]["mae"], partial["reconstruction"]["PCA"]
    partial["cell_type"]["PCA"]["knn"]["macro_f1"] = -1.0  # a mark: a resume keeps what was there
    (out / "results.json").write_text(json.dumps(partial))
    assert main([*args, "--overwrite"][:-1] + ["--no-plots", "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["missing"] == [] and resumed["cell_type"]["PCA"]["knn"]["macro_f1"] == -1.0
    assert resumed["cell_type"]["mae"] == first["cell_type"]["mae"]
    assert resumed["reconstruction"]["PCA"] == first["reconstruction"]["PCA"]
    assert main([*args, "--knn", "7", "--resume"]) == 2
    assert "knn: the evaluation was started with 5, this resume asks for 7" in capsys.readouterr().err
    assert main(args) == 2
    assert "pass --resume to finish an interrupted one" in capsys.readouterr().err
