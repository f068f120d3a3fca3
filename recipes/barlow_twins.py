"""Recipe: barlow_twins. `deepspeed recipes/barlow_twins.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/barlow_twins.py` (one process); `--help` lists every setting with its value. The settings are the paper
reference code's for this objective: engine/experiments.py, EXPERIMENTS["barlow_twins"]."""
from cellssl.engine.recipe import run

if __name__ == "__main__":
    run("barlow_twins")
