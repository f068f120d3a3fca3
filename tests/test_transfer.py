"""The transfer study recipe end to end at toy scale, and its summary table."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from test_trainer import run

from cellssl.engine.transfer import paired, summary


def test_transfer_study_runs_every_setting(tmp_path):
    out = tmp_path / "study"
    run([sys.executable, "recipes/transfer_study.py", "--out", str(out), "--aux-cells", "2000", "--target-cells",
         "600", "--n-genes", "800", "--seeds", "0", "--pretrain-steps", "2", "--finetune-steps", "2",
         "--batch-size", "256", "--finetune-batch-size", "128", "--methods", "mae_random",
         "--target-methods", "byol"])
    records = json.loads((out / "records.json").read_text())["records"]
    assert [(r["setting"], r["method"]) for r in records] == [("a", "supervised"), ("b", "mae_random"), ("c", "byol")]
    assert all(0.0 <= r["macro_f1"] <= 1.0 for r in records) and "knn_macro_f1" in records[1]
    assert 0.0 <= records[1]["probe_macro_f1"] <= 1.0 and 0.0 < records[1]["masked_fraction"] < 1.0
    assert records[2]["masked_fraction"] is None and records[1]["pretrain_epochs"] > 0
    from cellssl import loaders

    aux = loaders.CellStore(out / "auxiliary.cellstore")
    target = loaders.CellStore(out / "target.cellstore")
    assert set(aux.obs()["dataset_id"].unique()) <= {f"dataset_{d:02d}" for d in range(10)}
    assert set(target.obs()["dataset_id"].unique()) <= {"dataset_10", "dataset_11"}
    assert aux.n_genes == target.n_genes == 800 and list(aux.genes.gene_id) == list(target.genes.gene_id)
    assert "(b) SSL on auxiliary" in (out / "summary.md").read_text()


def test_summary_reports_mean_spread_and_paired_differences():
    records = [{"seed": s, "setting": "a", "method": "supervised", "macro_f1": f, "micro_f1": 0.9}
               for s, f in enumerate([0.5, 0.7, 0.6])]
    records += [{"seed": s, "setting": "b", "method": "mae_random", "macro_f1": f, "micro_f1": 0.9,
                 "probe_macro_f1": 0.5, "knn_macro_f1": 0.4, "masked_fraction": 0.5}
                for s, f in enumerate([0.6, 0.8, 0.65])]
    table = summary(records)
    assert "| (a) supervised on the target only | supervised | 3 | 0.6000 ± 0.1000 | 0.9000 ± 0.0000 | – | – | – |" \
        in table
    assert "| (b) mae_random | +0.0833 | [+0.0500, +0.1000] | 3/3 | 0.250 |" in table


def test_paired_differences():
    r = paired(np.zeros(5), np.array([0.1, 0.2, -0.1, 0.3, 0.1]))
    assert r["mean"] == pytest.approx(0.12) and r["wins"] == 4 and r["n"] == 5
    assert r["low"] < 0.12 < r["high"] and r["p"] == pytest.approx(0.375)
