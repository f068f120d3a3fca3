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
from cellssl.engine.models import AutoEncoder, ModelConfig
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
    # the scripts' values (scripts/pretraining/contrastive/*/BYOL.sh, BT.sh; masking/gp_to_gp, gp_to_tf/MLP.sh)
    assert (byol.objective.augment_p, byol.objective.noise_intensity, bt.objective.noise_intensity) == (0.3, 0.2, 0.2)
    assert (bt.warmup_epochs, bt.schedule_epochs) == (10, 1000)
    gp, tf = EXPERIMENTS["mae_gp_to_gp"], EXPERIMENTS["mae_gp_to_tf"]
    assert (gp.model.dropout, gp.weight_decay, gp.batch_size, tf.model.dropout, tf.weight_decay, tf.batch_size) == (
        0.05, 0.0, 32768, 0.05, 0.0, 16384)
    # pretraining keeps the best validation loss (the reference's best_checkpoint_val, what fine-tuning starts from)
    assert {EXPERIMENTS[k].select for k in PRETRAINING} == {"val_loss"}
    # the reference's classifier: ReLU, a block after the embedding, batch 16,384, best validation loss; dropout 0
    # from a pretrained encoder, 0.1 from scratch; our SELU variant one name away
    sup, sup_selu = EXPERIMENTS["supervised"], EXPERIMENTS["supervised_selu"]
    assert (ft.model.activation, ft.model.head_block, ft.batch_size, ft.select, ft.model.dropout) == (
        "relu", True, 16384, "val_loss", 0.0)
    assert (sup.model.activation, sup.model.dropout, sup_selu.model.activation, sup_selu.model.head_block,
            sup_selu.select) == ("relu", 0.1, "selu", False, "val_macro_f1")
    assert set(PRETRAINING) < set(EXPERIMENTS)
    assert deepspeed_config(mae, 1)["gradient_clipping"] == 1.0 and "optimizer" not in deepspeed_config(bt, 1)


def test_schedules():
    step = optim.schedule(EXPERIMENTS["mae_random"], steps_per_epoch=5)
    assert [step(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.9, pytest.approx(0.81)]
    bt = optim.schedule(TrainConfig(scheduler="warmup_cosine", warmup_epochs=2, schedule_epochs=20, max_steps=100), 5)
    assert bt(0) == pytest.approx(0.1) and bt(9) == pytest.approx(1.0) and bt(100) == pytest.approx(0.001)
    assert bt(10) > bt(50) > bt(90)
    # in epochs, as the reference: a shorter run follows the same curve and stops early on it
    short = optim.schedule(TrainConfig(scheduler="warmup_cosine", warmup_epochs=2, schedule_epochs=20, max_steps=30), 5)
    assert [short(s) for s in range(30)] == [bt(s) for s in range(30)]
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
    kinds = [_torch_name(m) for m in byol.projector]
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
         "--val-batches", "100", "--lr", "0.05", "--hidden", "32", "--latent", "8", "--select", "val_macro_f1"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scores = [r for r in records if "val_macro_f1" in r]
    best = max(scores, key=lambda r: r["val_macro_f1"])
    assert best.get("best") and len(scores) == 4
    assert (out / "model-last.safetensors").is_file()  # the last step kept beside the best
    store = CellStore(synthetic_store)
    start, stop = store.split("val")
    y = store.obs_codes("cell_type")[start:stop]
    predicted, _ = classify(out / "model.safetensors", store, "val", "cell_type")
    assert f1_scores(y, predicted)["macro_f1"] == pytest.approx(best["val_macro_f1"], abs=1e-6)


def test_a_classifier_scored_on_another_store_is_read_by_class_name(synthetic_store, tmp_path):
    """Fine-tuned on a store that lacks a cell type (its categories coded one off from the full store's), the
    classifier's predictions on the full store mean the same cell types as on its own store."""
    from cellssl.engine.evaluate.celltype import classify
    from cellssl.loaders.subset import subset_store

    store = CellStore(synthetic_store)
    codes = store.obs_codes("cell_type")
    rows = {s: np.flatnonzero(codes[slice(*store.split(s))] != 0) for s in store.splits}
    sub = subset_store(store, rows, tmp_path / "sub.cellstore")
    assert store.categories["cell_type"][0] not in list(sub.categories["cell_type"])
    out = tmp_path / "sup"
    run([sys.executable, "recipes/supervised.py", *recipe_args(sub.path, out, 4), "--hidden", "32", "--latent", "8"])
    said = {}
    for s in (sub, store):
        predicted, names = classify(out / "model.safetensors", s, "val", "cell_type")
        said[s.path] = dict(zip(s.cell_names()[slice(*s.split("val"))], (names[c] for c in predicted)))
    common = said[sub.path].keys() & said[store.path].keys()
    assert len(common) == len(said[sub.path]) > 0
    assert all(said[sub.path][c] == said[store.path][c] for c in common)


# The reference's classifier, written down from its code (models/base/base.py MLP with ReLU, built by MLPClassifier
# with hidden_channels = [512, 512, 256, 256, 64] + [classes]): (module, in, out) in order; dropout modules carry p.
REFERENCE_CLASSIFIER = [("Linear", "genes", 512), ("ReLU",), ("Dropout",), ("Linear", 512, 512), ("ReLU",),
                        ("Dropout",), ("Linear", 512, 256), ("ReLU",), ("Dropout",), ("Linear", 256, 256), ("ReLU",),
                        ("Dropout",), ("Linear", 256, 64), ("ReLU",), ("Dropout",), ("Linear", 64, "classes")]


def _structure(modules, genes: int, classes: int) -> list[tuple]:
    names = {genes: "genes", classes: "classes"}
    out = []
    for m in modules:
        if isinstance(m, torch.nn.Identity):  # our norm slot, empty without --norm
            continue
        if isinstance(m, torch.nn.Linear):
            out.append(("Linear", names.get(m.in_features, m.in_features), names.get(m.out_features, m.out_features)))
        else:  # our keyed dropout and global BatchNorm are torch's layers with other statistics: named as those
            out.append((_torch_name(m),))
    return out


def _torch_name(m) -> str:
    """The torch layer ours computes: keyed dropout is Dropout, global BatchNorm a synchronised BatchNorm1d."""
    name = next(c.__name__ for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))
    return "BatchNorm1d" if name == "SyncBatchNorm" else name


def test_the_registry_classifier_is_the_reference_network(tmp_path):
    from cellssl.engine.objectives import Supervised

    genes, classes = 300, 7
    for name in ("supervised", "finetune"):
        model = Supervised(genes, EXPERIMENTS[name].model, classes)
        assert _structure([*model.encoder, model.classifier], genes, classes) == REFERENCE_CLASSIFIER, name
    selu = Supervised(genes, EXPERIMENTS["supervised_selu"].model, classes)
    assert ("SELU",) in _structure(selu.encoder, genes, classes) and not isinstance(selu.encoder[-1], torch.nn.Dropout)
    # a SELU-pretrained encoder loads into it: its Linear layers sit at the same indices (the reference's
    # update_weights maps them by position)
    pretrained = AutoEncoder(genes, ModelConfig()).encoder.state_dict()
    model = Supervised(genes, EXPERIMENTS["finetune"].model, classes)
    model.encoder.load_state_dict(pretrained)
    assert torch.equal(model.encoder[16].weight, pretrained["16.weight"])


def test_byol_reads_the_256_unit_block_and_passes_both_views_together():
    from cellssl.engine.objectives import BYOL

    model = BYOL(300, ModelConfig(), seed=0)
    assert model.projector[0].in_features == 256  # the reference's hidden_layer=-2
    x = torch.rand(16, 300)
    loss, _ = model(x, None, 0)
    loss.backward()
    assert model.encoder[16].weight.grad is None  # the embedding layer gets no gradient in BYOL, as the reference
    assert model.encoder[0].weight.grad is not None
    seen = []
    hook = model.projector[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    model(x, None, 1)
    hook.remove()
    assert seen == [32]  # one BatchNorm pass over both views (2 × 16 cells), not one per view
