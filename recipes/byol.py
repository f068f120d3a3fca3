"""Recipe: byol. `deepspeed recipes/byol.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/byol.py` (one process). Paper hyper-parameters are the config defaults."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="byol", mask="random"), out="runs/byol")

if __name__ == "__main__":
    run(CONFIG)
