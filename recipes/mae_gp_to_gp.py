"""Recipe: mae_gp_to_gp. `deepspeed recipes/mae_gp_to_gp.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/mae_gp_to_gp.py` (one process); `--help` lists every setting with its value. The settings are the paper
reference code's for this objective: engine/experiments.py, EXPERIMENTS["mae_gp_to_gp"]."""
from cellssl.engine.recipe import run

if __name__ == "__main__":
    run("mae_gp_to_gp")
