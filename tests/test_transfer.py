"""The transfer study recipe end to end at toy scale, and its summary table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_trainer import run

ROOT = Path(__file__).resolve().parents[1]

from cellssl.engine.evaluate.study_stats import holm, paired, summary


def test_label_share_study_runs_every_setting_on_its_own_draws(tmp_path):
    out = tmp_path / "study"
    run([sys.executable, "recipes/transfer_study.py", "--out", str(out), "--aux-cells", "2000", "--target-cells",
         "600", "--n-genes", "800", "--seeds", "0,1", "--label-shares", "0.1,1", "--pretrain-steps", "2",
         "--finetune-steps", "2", "--batch-size", "256", "--methods", "mae_random", "--target-methods", "byol"])
    records = json.loads((out / "records.json").read_text())["records"]
    assert [(r["seed"], r["share"], r["setting"], r["method"]) for r in records][:3] == [
        (0, 0.1, "a", "supervised"), (0, 0.1, "b", "mae_random"), (0, 0.1, "c", "byol")]
    assert len(records) == 2 * 2 * 3
    assert {r["labelled_cells"] for r in records} == {36, 360}  # 10 % and all of the 360 training cells
    # what docs/results.md states about the shares comes from the records
    assert all(1 <= r["labelled_types"] <= r["labelled_cells"] and r["val_cells"] == 60 and r["test_cells"] == 180
               and 0 <= r["test_types_without_val_cells"] <= r["test_types_at_most_2_val_cells"] <= r["test_types"]
               for r in records)
    assert all(1 <= r["kept_step"] <= 2 for r in records)
    assert all(0 < r["effective_rank"] <= 64 and r["embedding_norm"] > 0 for r in records if r["setting"] != "a")
    saved = json.loads((out / "records.json").read_text())
    assert saved["facts"]["auxiliary"]["cells"] == 2000 and saved["facts"]["auxiliary"]["genes"] == 800
    assert saved["settings"]["finetune"]["lr"] == 9e-4 and saved["wall_seconds"] >= 0
    # fine-tuning: StepLR every 2 auxiliary epochs in optimiser steps (1,600 train cells / 256 → 6 steps per epoch),
    # and the kept model chosen on the whole validation split, however small the share's batch
    tuned = json.loads((out / "seed0" / "share0.1_b_mae_random" / "config.json").read_text())
    assert tuned["batch_size"] == 36 and tuned["val_batches"] == 0  # the whole validation split
    assert tuned["lr_step_epochs"] == 12 and saved["facts"]["lr_step_optimiser_steps"] == 12
    assert all(0.0 <= r[k] <= 1.0 for r in records for k in ("macro_f1", "paper_knn_f1"))
    assert all("frozen_paper_knn_f1" in r for r in records if r["setting"] != "a")
    ssl = [r for r in records if r["setting"] != "a"]
    assert all(0.0 <= r["share_probe_macro_f1"] <= 1.0 for r in ssl)  # the probe fitted on the share's labels only
    assert all(r["share_probe_macro_f1"] == pytest.approx(r["probe_macro_f1"]) for r in ssl if r["share"] == 1)
    from cellssl import loaders

    aux = loaders.CellStore(out / "auxiliary.cellstore")
    targets = [loaders.CellStore(out / f"target-seed{s}.cellstore") for s in (0, 1)]
    assert set(aux.obs()["dataset_id"].unique()) <= {f"dataset_{d:02d}" for d in range(10)}
    assert set(targets[0].obs()["dataset_id"].unique()) <= {"dataset_10", "dataset_11"}
    assert aux.n_genes == targets[0].n_genes == 800 and list(aux.genes.gene_id) == list(targets[1].genes.gene_id)
    assert targets[0].values_checksum() != targets[1].values_checksum()  # each seed draws its own target
    text = (out / "summary.md").read_text()
    assert "fitted on the labelled share" in text and "paper kNN F1" in text and "| 10% | (b) mae_random | 2 |" in text and "auxiliary store:" in text


def test_the_study_runs_on_given_stores_and_refuses_typos(tmp_path):
    from cellssl.loaders.synth import synth

    aux = synth(tmp_path / "aux.cellstore", 1500, progress=False)
    target = synth(tmp_path / "target.cellstore", 500, progress=False, draw=1, val_frac=0.1, test_frac=0.3)
    out = tmp_path / "study"
    args = [sys.executable, "recipes/transfer_study.py", "--out", str(out), "--aux", str(aux), "--target", str(target),
            "--seeds", "0", "--label-shares", "1", "--pretrain-steps", "1", "--finetune-steps", "1",
            "--batch-size", "256", "--methods", "mae_random"]
    run(args)
    assert f"auxiliary store: {aux}; target: {target}" in (out / "summary.md").read_text()
    done = subprocess.run([*args[:2], "--label-share", "0.5"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unrecognized arguments: --label-share" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_summary_reports_seeds_as_they_are_and_paired_t_intervals():
    records = [{"seed": s, "share": 0.1, "setting": "a", "method": "supervised", "macro_f1": f, "paper_knn_f1": f}
               for s, f in enumerate([0.5, 0.7, 0.6])]
    records += [{"seed": s, "share": 0.1, "setting": "b", "method": "mae_random", "macro_f1": f, "paper_knn_f1": f,
                 "frozen_paper_knn_f1": 0.4, "knn_macro_f1": 0.4, "probe_macro_f1": 0.5, "masked_fraction": 0.5}
                for s, f in enumerate([0.6, 0.8, 0.65])]
    table = summary(records, margin=0.02)
    assert "| (a) supervised on the labelled share | supervised | 0.600 [0.500, 0.700] |" in table
    # differences 0.10, 0.10, 0.05: mean 0.0833, sd 0.0289, t(2, 0.975) = 4.303 → ± 0.0717
    assert "| 10% | (b) mae_random | 3 | +0.083 | [+0.012, +0.155] |" in table and "| better |" in table


def test_paired_differences_and_the_stated_margin():
    r = paired(np.zeros(5), np.array([0.1, 0.2, -0.1, 0.3, 0.1]), margin=0.02)
    assert r["mean"] == pytest.approx(0.12) and r["wins"] == 4 and r["n"] == 5
    assert r["t_low"] < 0.12 < r["t_high"] and r["boot_low"] < 0.12 < r["boot_high"]
    assert r["verdict"] == "inconclusive"  # neither side of zero, nor inside ±0.02
    tight = paired(np.zeros(6), np.array([0.001, -0.002, 0.0, 0.001, 0.002, -0.001]), margin=0.02)
    assert tight["verdict"] == "negligible (within ±0.02)"
    assert paired(np.zeros(4), -np.array([0.1, 0.12, 0.11, 0.09]), margin=0.02)["verdict"] == "worse"


def test_holm_adjusts_the_family_and_the_summary_says_which_calls_hold():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2]) == [0.2] and holm([0.6, 0.6]) == [1.0, 1.0]
    records = [{"seed": s, "share": sh, "setting": "a", "method": "supervised", "macro_f1": 0.5, "paper_knn_f1": 0.5}
               for s in range(4) for sh in (0.1, 1.0)]
    records += [{"seed": s, "share": sh, "setting": "b", "method": "mae_random", "macro_f1": 0.5 + d,
                 "paper_knn_f1": 0.5 + d / 5} for s, d in enumerate([0.1, 0.12, 0.11, 0.13]) for sh in (0.1, 1.0)]
    table = summary(records, margin=0.02)
    assert "| after Holm |" in table and "| better |" in table and "holds |" in table


def test_the_byol_check_refuses_a_missing_study_and_typos_in_one_line(tmp_path, capsys):
    from cellssl.engine.evaluate.byol_check import main

    for argv, said in (([str(tmp_path / "nowhere")], "records.json: no study records. Fix: run `cellssl study --out DIR`"),
                       ([str(tmp_path), "--targets", "ema,frozn"], "--targets: unknown target network(s)"),
                       ([str(tmp_path), "--seeds", "0,a"], "--seeds/--lrs: not a comma-separated list"),
                       ([str(tmp_path), "--seed", "0"], "unrecognized arguments: --seed")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and said in err and err.count("\n") == 1, (argv, err)
