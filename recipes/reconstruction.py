"""Recipe: reconstruction. `deepspeed recipes/reconstruction.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/reconstruction.py` (one process); `--help` lists every setting with its value. The settings are the paper
reference code's for this objective: engine/experiments.py, EXPERIMENTS["reconstruction"]."""
from cellssl.engine.recipe import run

if __name__ == "__main__":
    run("reconstruction")
