"""Each objective trains as the reference code does (docs/fidelity.md): the registry's settings, the optimiser and
schedule built from them, the heads, the EMA, the masked fraction, class weights and best-checkpoint fine-tuning."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from test_trainer import recipe_args, run

from cellssl.engine import optim
from cellssl.engine.config import TrainConfig
from cellssl.engine.experiments import EXPERIMENTS, PRETRAINING
from cellssl.engine.models import ModelConfig
from cellssl.engine.setup import build_objective, class_weights
from cellssl.engine.trainer import deepspeed_config
from cellssl.loaders import BatchStream, CellStore

SMALL = ModelConfig(hidden=(64, 32), latent=16, dropout=0.0)


def test_registry_holds_the_reference_settings():
    mae, byol, bt, ft = (EXPERIMENTS[k] for k in ("mae_random", "byol", "barlow_twins", "finetune"))
    assert (mae.optimizer, mae.lr, mae.weight_decay, mae.scheduler, mae.lr_step_epochs, mae.lr_gamma,
            mae.gradient_clipping, mae.batch_size, mae.model.dropout) == ("adamw", 1e-3, 0.01, "step", 2, 0.9, 1.0,
                                                                         8192, 0.1)
    assert (byol.lr, byol.weight_decay, byol.scheduler, byol.model.dropout, byol.objective.ema) == (
        1e-2, 1e-5, "none", 0.0, 0.99)
    assert (bt.optimizer, bt.lr, bt.lr_biases, bt.scheduler, bt.gradient_clipping, bt.model.dropout,
            bt.objective.lambd) == ("lars", 0.2, 0.0048, "warmup_cosine", 0.0, 0.0, 0.0051)
    assert (ft.lr, ft.weight_decay, ft.objective.class_weighted) == (9e-4, 0.05, True)
    assert set(PRETRAINING) < set(EXPERIMENTS)
    assert deepspeed_config(mae, 1)["gradient_clipping"] == 1.0 and "optimizer" not in deepspeed_config(bt, 1)


def test_schedules():
    step = optim.schedule(EXPERIMENTS["mae_random"], steps_per_epoch=5)
    assert [step(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.9, pytest.approx(0.81)]
    bt = optim.schedule(TrainConfig(scheduler="warmup_cosine", warmup_fraction=0.1, max_steps=100), 5)
    assert bt(0) == pytest.approx(0.1) and bt(9) == pytest.approx(1.0) and bt(100) == pytest.approx(0.001)
    assert bt(10) > bt(50) > bt(90)
    assert optim.schedule(TrainConfig(scheduler="none"), 5)(1000) == 1.0


def test_lars_scales_by_batch_and_keeps_its_state():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    opt = optim.lars(model.parameters(), EXPERIMENTS["barlow_twins"], global_batch=512)
    weights, biases = opt.param_groups
    assert weights["lr"] == pytest.approx(0.4) and biases["lr"] == pytest.approx(0.0096)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    for _ in range(2):
        model(torch.randn(16, 8)).pow(2).sum().backward()
        opt.step()
    momentum = opt.state[weights["params"][0]]["momentum"]
    assert momentum.abs().sum() > 0  # carried across steps: the optimiser is built once


def test_contrastive_heads_and_the_ema(synthetic_store):
    store = CellStore(synthetic_store)
    byol = build_objective(TrainConfig(objective=EXPERIMENTS["byol"].objective, model=SMALL), store)
    kinds = [type(m).__name__ for m in byol.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"] and byol.projector[0].out_features == 4096
    bt = build_objective(TrainConfig(objective=EXPERIMENTS["barlow_twins"].objective, model=SMALL), store)
    assert [m.out_features for m in bt.projector if isinstance(m, torch.nn.Linear)] == [256, 256, 512, 512]
    assert all(m.bias is None for m in bt.projector if isinstance(m, torch.nn.Linear))
    target = [p.clone() for p in byol.target_encoder.parameters()]
    opt = torch.optim.SGD([p for p in byol.parameters() if p.requires_grad], lr=0.1)
    batch = next(iter(BatchStream(store, "train", 64, columns=[])))
    loss, _ = byol(batch.x, None, 0)
    loss.backward()
    opt.step()
    byol.after_step()
    for t0, t1, online in zip(target, byol.target_encoder.parameters(), byol.encoder.parameters()):
        torch.testing.assert_close(t1, 0.99 * t0 + 0.01 * online.detach())


def test_masked_fraction_is_reported(synthetic_store):
    store = CellStore(synthetic_store)
    batch = next(iter(BatchStream(store, "train", 64, columns=[])))
    for name, expect in (("mae_random", (0.49, 0.51)), ("mae_gene_program", (0.01, 0.99))):
        objective = build_objective(TrainConfig(objective=EXPERIMENTS[name].objective, model=SMALL), store)
        _, metrics = objective(batch.x, None, 0)
        assert expect[0] < metrics["masked_fraction"] < expect[1]


def test_class_weights_are_balanced(synthetic_store):
    store = CellStore(synthetic_store)
    w = class_weights(store, "cell_type", len(store.categories["cell_type"]))
    start, stop = store.split("train")
    codes = store.obs_codes("cell_type")[start:stop]
    counts = np.bincount(codes, minlength=len(w))
    present = counts > 0
    assert np.allclose((w.numpy() * counts)[present], len(codes) / present.sum())  # each class weighs the same


def test_finetuning_exports_the_best_validation_step(synthetic_store, tmp_path):
    from cellssl.engine.evaluate.celltype import classify
    from cellssl.engine.evaluate.metrics import f1_scores

    out = tmp_path / "sup"
    run([sys.executable, "recipes/supervised.py", *recipe_args(synthetic_store, out, 8), "--val-every", "2",
         "--val-batches", "100", "--lr", "0.05", "--hidden", "32", "--latent", "8"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scores = [r for r in records if "val_macro_f1" in r]
    best = max(scores, key=lambda r: r["val_macro_f1"])
    assert best.get("best") and len(scores) == 4
    store = CellStore(synthetic_store)
    start, stop = store.split("val")
    y = store.obs_codes("cell_type")[start:stop]
    predicted = classify(out / "model.safetensors", store, "val")
    assert f1_scores(y, predicted)["macro_f1"] == pytest.approx(best["val_macro_f1"], abs=1e-6)
