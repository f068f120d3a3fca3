"""Recipe: barlow_twins. `deepspeed recipes/barlow_twins.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/barlow_twins.py` (one process). Paper hyper-parameters are the config defaults."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="barlow_twins", mask="random"), out="runs/barlow_twins")

if __name__ == "__main__":
    run(CONFIG)
