"""Does BYOL collapse in the transfer study because of the reference's learning rate (1e-2)? Pretrains BYOL on the
study's auxiliary store at the given learning rates, otherwise with the study's settings, and scores it on the
target as the study does (linear probe, zero-shot kNN, fine-tuning). docs/results.md reports the run.
`python recipes/byol_lr_check.py STUDY_DIR SEEDS LRS OUT_DIR`, e.g.
`python recipes/byol_lr_check.py runs/transfer_study 0,1 0.001 runs/byol_lr_check` (after recipes/transfer_study.py
with the sizes docs/results.md gives)."""
import json
import sys
from dataclasses import replace
from pathlib import Path

from cellssl.engine.experiments import experiment
from cellssl.engine.trainer import train
from cellssl.engine.transfer import StudyConfig, finetune, frozen_scores, stores

root, seeds, lrs = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], [float(v) for v in sys.argv[3].split(",")]
cfg = StudyConfig(out=str(root), aux_cells=12000, target_cells=3000, n_genes=1500, pretrain_steps=120, batch_size=512,
                  finetune_steps=100, finetune_batch_size=256, precision="fp32")
aux, target = stores(cfg, root)  # the study's stores (built if missing)
out = Path(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
for lr in lrs:
    for seed in seeds:
        run = out / f"byol_lr{lr:g}_seed{seed}"
        model = train(replace(experiment("byol"), data=str(aux.path), out=str(run / "pretrain"), seed=seed, lr=lr,
                              batch_size=512, max_steps=120, log_every=6, val_every=30, checkpoint_every=120,
                              overwrite=True))
        record = {"lr": lr, "seed": seed, **frozen_scores(cfg, model, target), **finetune(cfg, target, model, seed,
                                                                                         run / "finetune")}
        print(json.dumps(record), flush=True)
        with open(out / "records.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
