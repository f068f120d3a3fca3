"""Recipe: mae_random. `deepspeed recipes/mae_random.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/mae_random.py` (one process); `--help` lists every setting with its value. The settings are the paper
reference code's for this objective: engine/experiments.py, EXPERIMENTS["mae_random"]."""
from cellssl.engine.recipe import run

if __name__ == "__main__":
    run("mae_random")
