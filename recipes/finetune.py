"""Recipe: fine-tune a pretrained encoder for cell-type classification.
`deepspeed recipes/finetune.py --init-encoder runs/mae_random/model.pt [--data STORE] [--max-steps N]`."""
from cellssl.engine.config import ObjectiveConfig, TrainConfig
from cellssl.engine.recipe import run

CONFIG = TrainConfig(objective=ObjectiveConfig(name="supervised"), out="runs/finetune")

if __name__ == "__main__":
    run(CONFIG)
