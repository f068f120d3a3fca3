"""Every objective's loss falls on the synthetic atlas within a few dozen small steps (plain torch, no DeepSpeed)."""
from __future__ import annotations

import pytest
import torch

from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.models import AutoEncoder, ModelConfig
from cellssl.engine.setup import build_objective
from cellssl.loaders import BatchStream, CellStore, InputError

SMALL = ModelConfig(hidden=(64, 32), latent=16, dropout=0.0)


def config(name, mask="random", programmes=None, **kw):
    return TrainConfig(objective=ObjectiveConfig(name=name, mask=mask, programmes=programmes, **kw), model=SMALL)


def losses(objective, store, steps=40, lr=3e-3):
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=lr)
    stream = BatchStream(store, "train", batch_size=256, seed=0)
    out = []
    for step, batch in enumerate(stream.endless()):
        if step == steps:
            break
        loss, _ = objective(batch.x, batch.obs.get("cell_type"), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.after_step()
        out.append(float(loss.detach()))
    return out


CASES = [("reconstruction", "random"), ("mae", "random"), ("mae", "gene_program"), ("mae", "gp_to_gp"),
         ("mae", "gp_to_tf"), ("byol", "random"), ("barlow_twins", "random"), ("supervised", "random")]


@pytest.mark.parametrize("name,mask", CASES)
def test_loss_falls(synthetic_store, name, mask):
    store = CellStore(synthetic_store)
    programmes = str(synthetic_store / "synthetic_truth" / ("tf_targets.gmt" if mask == "gp_to_tf" else
                                                            "programmes.gmt")) if mask != "random" else None
    per = "cell" if mask in ("gp_to_gp", "gp_to_tf") else "batch"  # one programme per batch is too noisy to see
    objective = build_objective(config(name, mask, programmes, per=per), store)
    # BYOL's target moves only by EMA: its loss first rises while the target catches up (80 steps show the fall)
    trace = losses(objective, store, steps=80 if name == "byol" else 40)
    assert all(map(lambda v: v == v, trace))  # no NaN
    first, last = sum(trace[:5]) / 5, sum(trace[-5:]) / 5
    assert last < 0.8 * first, (name, mask, first, last)


def test_paper_architecture():
    model = AutoEncoder(19350)
    widths = [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert widths == [512, 512, 256, 256, 64]
    assert [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)] == [256, 256, 512, 512, 19350]
    assert any(isinstance(m, torch.nn.SELU) for m in model.encoder)
    assert [m.p for m in model.encoder if isinstance(m, torch.nn.Dropout)] == [0.1] * 4


def test_bad_configurations(synthetic_store, tmp_path):
    store = CellStore(synthetic_store)
    with pytest.raises(InputError, match="unknown objective .simclr."):
        build_objective(config("simclr"), store)
    (tmp_path / "mouse.gmt").write_text("P\td\tNotAGene1\tNotAGene2\n")
    with pytest.raises(InputError, match="none of the 2 programme genes"):
        build_objective(config("mae", "gene_program", str(tmp_path / "mouse.gmt")), store)
    with pytest.raises(InputError, match="no categorical column 'tumour_stage'"):
        build_objective(config("supervised", label="tumour_stage"), store)
    build_objective(config("mae", "gp_to_tf"), store)  # a synthetic store carries its own TF → targets
    import shutil

    bare = tmp_path / "bare.cellstore"
    shutil.copytree(synthetic_store, bare, ignore=shutil.ignore_patterns("synthetic_truth"))
    with pytest.raises(InputError, match="needs a TF"):
        build_objective(config("mae", "gp_to_tf"), CellStore(bare))


def test_finetuning_starts_from_the_pretrained_encoder(synthetic_store, tmp_path):
    from cellssl.engine.checkpoint import export_model

    store = CellStore(synthetic_store)
    pretrained = build_objective(config("mae"), store)
    export_model(pretrained, config("mae").to_json(), list(store.genes.gene_id), tmp_path / "model.safetensors")
    cfg = config("supervised")
    cfg.init_encoder = str(tmp_path / "model.safetensors")
    finetune = build_objective(cfg, store)
    for a, b in zip(pretrained.encoder.state_dict().values(), finetune.encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert not hasattr(finetune.autoencoder, "decoder")


@pytest.mark.parametrize("name", ["mae", "byol"])
def test_bf16_compute_trains_and_keeps_fp32_weights(synthetic_store, name):
    """bf16 autocast: the MAE's loss falls as in fp32; BYOL (whose 4,096-wide heads are slow where the CPU emulates
    bf16, without AVX512-BF16) takes a few finite steps. Weights stay float32 either way."""
    store = CellStore(synthetic_store)
    cfg = config(name)
    cfg.precision = "bf16"
    objective = build_objective(cfg, store)
    assert objective.compute_dtype == torch.bfloat16
    trace = losses(objective, store, steps=40 if name == "mae" else 3)
    assert all(v == v and abs(v) < float("inf") for v in trace)
    if name == "mae":
        assert sum(trace[-5:]) / 5 < 0.8 * sum(trace[:5]) / 5
    assert all(p.dtype == torch.float32 for p in objective.parameters())
    cfg.precision = "fp8"
    with pytest.raises(ValueError, match="precision must be"):
        build_objective(cfg, store)
