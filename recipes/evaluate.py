"""Recipe: evaluate pretrained models on a labelled store: cell-type prediction (linear probe, kNN, fine-tuning),
reconstruction, cross-modality prediction and scIB integration, beside PCA and a supervised model from scratch.
`python recipes/evaluate.py runs/mae_random/model.pt [NAME=MODEL …] [--data STORE] [--out DIR]`; with no model
it evaluates every `runs/*/model.pt` that a pretraining recipe wrote. Same options as `cellssl eval`."""
import sys
from pathlib import Path

from cellssl.engine.cli import main

PRETRAINING = ("mae_random", "mae_gene_program", "mae_gp_to_gp", "mae_gp_to_tf", "byol", "barlow_twins",
               "reconstruction")

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.endswith(".pt") for a in argv):
        argv = [str(p) for p in (Path("runs") / r / "model.pt" for r in PRETRAINING) if p.is_file()] + argv
    sys.exit(main(["eval", *argv]))
