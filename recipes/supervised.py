"""Recipe: supervised. `deepspeed recipes/supervised.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/supervised.py` (one process); `--help` lists every setting with its value. The settings are the paper
reference code's for this objective: engine/experiments.py, EXPERIMENTS["supervised"]."""
from cellssl.engine.recipe import run

if __name__ == "__main__":
    run("supervised")
