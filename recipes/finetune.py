"""Recipe: finetune. `deepspeed recipes/finetune.py --init-encoder runs/mae_random [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/finetune.py` (one process); `--help` lists every setting with its value. The settings are the paper
reference code's for this objective: engine/experiments.py, EXPERIMENTS["finetune"]."""
from cellssl.engine.recipe import run

if __name__ == "__main__":
    run("finetune")
