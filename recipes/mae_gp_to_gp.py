"""Recipe: mae_gp_to_gp. `deepspeed recipes/mae_gp_to_gp.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/mae_gp_to_gp.py` (one process). Paper hyper-parameters are the config defaults."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="mae", mask="gp_to_gp", per="cell"), out="runs/mae_gp_to_gp")

if __name__ == "__main__":
    run(CONFIG)
