"""Why does BYOL collapse in the transfer study? Pretrains BYOL on the study's auxiliary store at the given learning
rates and target networks (EMA, the paper's intent, or frozen, as the reference code runs), otherwise with the
study's settings, and scores it on seed's target as the study does (linear probe, kNN, the paper's kNN, fine-tuning).
Each record adds the frozen embedding's effective rank (exp of the entropy of its normalised singular values) and
mean norm, the signs of a collapse. docs/results.md reports the run.
`python recipes/byol_lr_check.py STUDY_DIR SEEDS LRS TARGETS OUT_DIR`, e.g.
`python recipes/byol_lr_check.py runs/transfer_study 0,1 0.01,0.001 ema,frozen runs/byol_check` (after
recipes/transfer_study.py with the sizes docs/results.md gives; the study's config.json-like records.json names them)."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from cellssl.engine.evaluate.representations import ModelRepresentation
from cellssl.engine.experiments import experiment
from cellssl.engine.trainer import train
from cellssl.engine.transfer import StudyConfig, aux_store, finetune, frozen_scores, target_store


def collapse_signs(model: Path, target) -> dict:
    z = ModelRepresentation(model).embed(target, "test").astype(np.float64)
    s = np.linalg.svd(z - z.mean(0), compute_uv=False)
    p = s / s.sum()
    return {"effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
            "embedding_norm": float(np.linalg.norm(z, axis=1).mean())}


def main(root: Path, seeds: list[int], lrs: list[float], targets: list[str], out: Path) -> None:
    study = json.loads((root / "records.json").read_text())["config"]
    cfg = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in study.items()})
    aux = aux_store(cfg, root)
    out.mkdir(parents=True, exist_ok=True)
    for target_kind in targets:
        for lr in lrs:
            for seed in seeds:
                target, run = target_store(cfg, root, seed), out / f"byol_{target_kind}_lr{lr:g}_seed{seed}"
                start, stop = aux.split("train")
                base = experiment("byol")
                model = train(replace(base, data=str(aux.path), out=str(run / "pretrain"), seed=seed, lr=lr,
                                      objective=replace(base.objective, byol_target=target_kind), batch_size=min(cfg.batch_size, stop - start),
                                      max_steps=cfg.pretrain_steps, log_every=max(1, cfg.pretrain_steps // 20),
                                      val_every=max(1, cfg.pretrain_steps // 4), precision=cfg.precision,
                                      checkpoint_every=cfg.pretrain_steps, overwrite=True))
                record = {"target": target_kind, "lr": lr, "seed": seed, **collapse_signs(model, target),
                          **frozen_scores(cfg, model, target),
                          **finetune(cfg, target, target, model, seed, run / "finetune")}
                print(json.dumps(record), flush=True)
                with open(out / "records.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(Path(a[0]), [int(s) for s in a[1].split(",")], [float(v) for v in a[2].split(",")], a[3].split(","),
         Path(a[4]))
