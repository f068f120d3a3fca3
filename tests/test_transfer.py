"""The transfer study recipe end to end at toy scale, and its summary table."""
from __future__ import annotations

import json
import sys

from test_trainer import run

from cellssl.engine.evaluate.transfer import summary


def test_transfer_study_runs_every_setting(tmp_path):
    out = tmp_path / "study"
    run([sys.executable, "recipes/transfer_study.py", "--out", str(out), "--aux-cells", "2000", "--target-cells",
         "600", "--n-genes", "800", "--seeds", "0", "--pretrain-steps", "2", "--finetune-steps", "2",
         "--batch-size", "256", "--finetune-batch-size", "128", "--methods", "mae_random",
         "--target-methods", "byol"])
    records = json.loads((out / "records.json").read_text())["records"]
    assert [(r["setting"], r["method"]) for r in records] == [("a", "supervised"), ("b", "mae_random"), ("c", "byol")]
    assert all(0.0 <= r["macro_f1"] <= 1.0 for r in records) and "knn_macro_f1" in records[1]
    from cellssl import loaders

    aux = loaders.CellStore(out / "auxiliary.cellstore")
    target = loaders.CellStore(out / "target.cellstore")
    assert set(aux.obs()["dataset_id"].unique()) <= {f"dataset_{d:02d}" for d in range(10)}
    assert set(target.obs()["dataset_id"].unique()) <= {"dataset_10", "dataset_11"}
    assert aux.n_genes == target.n_genes == 800 and list(aux.genes.gene_id) == list(target.genes.gene_id)
    assert "(b) SSL on auxiliary" in (out / "summary.md").read_text()


def test_summary_reports_mean_and_spread_over_seeds():
    records = [{"seed": s, "setting": "a", "method": "supervised", "macro_f1": f, "micro_f1": 0.9}
               for s, f in enumerate([0.5, 0.7, 0.6])]
    table = summary(records)
    assert "| (a) supervised on the target only | supervised | 3 | 0.6000 ± 0.1000 | 0.9000 ± 0.0000 | – |" in table
