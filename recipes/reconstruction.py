"""Recipe: reconstruction. `deepspeed recipes/reconstruction.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/reconstruction.py` (one process). Paper hyper-parameters are the config defaults."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="reconstruction", mask="random"), out="runs/reconstruction")

if __name__ == "__main__":
    run(CONFIG)
