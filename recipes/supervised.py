"""Recipe: supervised. `deepspeed recipes/supervised.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/supervised.py` (one process). Paper hyper-parameters are the config defaults."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="supervised", mask="random"), out="runs/supervised")

if __name__ == "__main__":
    run(CONFIG)
