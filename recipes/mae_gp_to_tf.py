"""Recipe: mae_gp_to_tf. `deepspeed recipes/mae_gp_to_tf.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/mae_gp_to_tf.py` (one process). Paper hyper-parameters are the config defaults."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="mae", mask="gp_to_tf", per="cell"), out="runs/mae_gp_to_tf")

if __name__ == "__main__":
    run(CONFIG)
