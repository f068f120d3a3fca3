"""The plots a user reads: every cell type its own colour up to the palette's 60, then the rarest as "other", legends
beside the axes; fine-tuned networks and frozen-embedding probes in separate panels; every point of a short run's
curve marked."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cellssl.engine.evaluate import report  # noqa: E402


def _legend(codes: np.ndarray, names: list[str]) -> list[str]:
    fig, ax = plt.subplots()
    report._scatter(ax, np.random.default_rng(0).standard_normal((len(codes), 2)), codes, names, 5.0)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    colours = {tuple(np.round(c.get_facecolor()[0], 3)) for c in ax.collections}
    plt.close(fig)
    return texts, colours


def test_forty_types_get_forty_colours_and_more_than_the_palette_share_other():
    assert len({tuple(c) for c in report.palette()}) == 60
    codes = np.repeat(np.arange(40), np.arange(40, 0, -1))
    texts, colours = _legend(codes, [f"type {i}" for i in range(40)])
    assert len(texts) == 40 and len(colours) == 40 and texts[0] == "type 0 (40)"
    codes = np.concatenate([np.repeat(np.arange(70), 3), [-1, -1]])
    texts, colours = _legend(codes, [f"type {i}" for i in range(70)])
    assert texts[0] == "other (11 rarer)" and len(texts) == 60 and len(colours) == 60  # grey + 59 of their own


def test_per_class_f1_puts_fine_tuned_and_probe_scores_in_separate_panels(tmp_path, monkeypatch):
    results = {"cell_type": {"mae": {"finetune": {"per_class_f1": {"a": 0.5, "b": 0.7}}},
                             "PCA": {"linear_probe": {"per_class_f1": {"a": 0.9, "b": 0.1}}}}}
    titles = []
    real = plt.Axes.set
    monkeypatch.setattr(plt.Axes, "set", lambda self, **kw: (titles.append(kw.get("title")), real(self, **kw))[1])
    written = report.plots(results, {}, np.zeros(3, int), ["a", "b"], None, tmp_path)
    assert [p.split("/")[-1] for p in written] == ["per_class_f1.png"]
    assert sorted(t for t in titles if t) == ["per-class F1 on the test split: fine-tuned networks",
                                             "per-class F1 on the test split: linear probes on the frozen embeddings"]


def test_curves_of_short_runs_mark_every_point(tmp_path):
    from cellssl.engine import plot

    fig, ax = plt.subplots()
    plot._panel(ax, {"short": [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)],
                     "long": [{"step": s, "loss": 1.0 / s} for s in range(1, 200)]}, ["short", "long"], "loss",
                "loss", False)
    markers = {line.get_label(): line.get_marker() for line in ax.lines}
    plt.close(fig)
    assert markers["short"] == "o" and markers["long"] in (None, "None", "")
