"""Recipe: mae_gene_program. `deepspeed recipes/mae_gene_program.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/mae_gene_program.py` (one process). Paper hyper-parameters are the config defaults."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="mae", mask="gene_program"), out="runs/mae_gene_program")

if __name__ == "__main__":
    run(CONFIG)
