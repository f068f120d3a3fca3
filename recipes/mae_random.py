"""Recipe: mae_random. `deepspeed recipes/mae_random.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/mae_random.py` (one process). Paper hyper-parameters are the config defaults."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="mae", mask="random"), out="runs/mae_random")

if __name__ == "__main__":
    run(CONFIG)
