"""The evaluation scores on hand-made cases with known answers, and against scikit-learn where it defines them."""
import numpy as np
import pytest
from sklearn.metrics import explained_variance_score

from cellssl.engine.evaluate.metrics import ExplainedVariance, explained_variance, f1_scores, pearson


def test_f1_perfect_and_all_wrong():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    perfect = f1_scores(y, y, ["a", "b", "c"])
    assert perfect["macro_f1"] == perfect["micro_f1"] == 1.0
    assert perfect["per_class_f1"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert perfect["support"] == {"a": 4, "b": 2, "c": 1}
    wrong = f1_scores(y, (y + 1) % 3)
    assert wrong["macro_f1"] == wrong["micro_f1"] == 0.0


def test_macro_f1_weighs_rare_classes_like_common_ones():
    y = np.array([0] * 98 + [1, 1])
    majority = f1_scores(y, np.zeros_like(y))  # always the common class
    assert majority["micro_f1"] == pytest.approx(0.98)
    assert majority["macro_f1"] == pytest.approx((2 * 0.98 / 1.98 + 0.0) / 2)


def test_f1_of_random_predictions_is_near_chance():
    rng = np.random.default_rng(0)
    y, guess = rng.integers(0, 4, 20_000), rng.integers(0, 4, 20_000)
    assert f1_scores(y, guess)["macro_f1"] == pytest.approx(0.25, abs=0.02)


def test_f1_rejects_mismatched_lengths_and_empty_input():
    with pytest.raises(ValueError, match="3 true values but 2 predictions"):
        f1_scores([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no labelled cells"):
        f1_scores([], [])


def test_explained_variance_known_values():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(500, 8))
    assert explained_variance(y, y)["variance_weighted"] == pytest.approx(1.0)
    mean = np.broadcast_to(y.mean(0), y.shape)
    assert explained_variance(y, mean)["variance_weighted"] == pytest.approx(0.0, abs=1e-12)
    # prediction y/2: residual y/2 has a quarter of the variance → 0.75 for every feature
    half = explained_variance(y, y / 2)
    assert half["variance_weighted"] == pytest.approx(0.75) and half["uniform"] == pytest.approx(0.75)
    # a constant offset is not penalised (explained variance, not R²)
    assert explained_variance(y, y + 3.0)["variance_weighted"] == pytest.approx(1.0)


def test_explained_variance_matches_sklearn_streamed_in_batches():
    rng = np.random.default_rng(2)
    y = rng.gamma(1.0, 1.0, (900, 30)) * rng.uniform(0.1, 5, 30)
    y[:, 3] = 2.0                                  # a constant feature
    y_hat = y + rng.normal(0, 0.7, y.shape)
    y_hat[:, 3] = 2.0                              # predicted exactly: scores 1, weight 0
    score = ExplainedVariance(30)
    for rows in np.array_split(np.arange(900), 7):
        score.update(y[rows], y_hat[rows])
    got = score.result()
    assert got["variance_weighted"] == pytest.approx(explained_variance_score(y, y_hat, multioutput="variance_weighted"))
    assert got["uniform"] == pytest.approx(explained_variance_score(y, y_hat, multioutput="uniform_average"))


def test_explained_variance_on_masked_positions_only():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(400, 5))
    mask = rng.random(y.shape) < 0.5
    y_hat = np.where(mask, y / 2, 0.0)             # right on masked positions up to scale, nonsense elsewhere
    assert explained_variance(y, y_hat, mask)["variance_weighted"] == pytest.approx(0.75, abs=1e-9)
    assert explained_variance(y, y_hat, np.ones_like(mask))["variance_weighted"] == pytest.approx(
        explained_variance_score(y, y_hat, multioutput="variance_weighted"))


def test_explained_variance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must both be"):
        explained_variance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_pearson_perfect_anticorrelated_and_undefined():
    rng = np.random.default_rng(4)
    y = rng.normal(size=(50, 6))
    same = pearson(y, 2 * y + 1, [f"p{j}" for j in range(6)])
    assert same["pearson_per_cell"] == pytest.approx(1.0) and same["pearson_per_feature"] == pytest.approx(1.0)
    assert set(same["per_feature"]) == {f"p{j}" for j in range(6)}
    assert pearson(y, -y)["pearson_per_feature"] == pytest.approx(-1.0)
    flat = y.copy()
    flat[:, 0] = 1.0                                # a constant feature has no correlation
    got = pearson(flat, flat)
    assert got["per_feature"]["0"] is None and got["undefined"]["features"] == 1
    assert got["pearson_per_feature"] == pytest.approx(1.0)


def test_pearson_of_independent_values_is_near_zero():
    rng = np.random.default_rng(5)
    assert abs(pearson(rng.normal(size=(5000, 4)), rng.normal(size=(5000, 4)))["pearson_per_feature"]) < 0.05


def test_pearson_rejects_mismatched_cells():
    with pytest.raises(ValueError, match="must both be"):
        pearson(np.zeros((5, 2)), np.zeros((4, 2)))
