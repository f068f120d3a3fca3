"""Recipe: evaluate pretrained models on a labelled store: cell-type prediction (linear probe, kNN, fine-tuning),
reconstruction, cross-modality prediction and scIB integration, beside PCA and a supervised model from scratch.
`python recipes/evaluate.py runs/mae_random [NAME=RUN …] [--data STORE] [--out DIR]`; with no model it evaluates
every finished pretraining run of the experiment registry under runs/. Same options as `cellssl eval`."""
import sys
from pathlib import Path

from cellssl.engine.checkpoint import MODEL_FILE
from cellssl.engine.cli import main
from cellssl.engine.experiments import EXPERIMENTS, PRETRAINING

if __name__ == "__main__":
    argv = sys.argv[1:]
    given = [a for a in argv if (Path(a.rpartition("=")[2]) / MODEL_FILE).is_file() or a.endswith(".safetensors")]
    if not given:
        argv = [f"{name}={Path(EXPERIMENTS[name].out)}" for name in PRETRAINING
                if (Path(EXPERIMENTS[name].out) / MODEL_FILE).is_file()] + argv
    sys.exit(main(["eval", *argv]))
