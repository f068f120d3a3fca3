"""Recipe: mae_gene_program. `deepspeed recipes/mae_gene_program.py [--data STORE] [--max-steps N] [--out DIR] [--resume]`
or `python recipes/mae_gene_program.py` (one process); `--help` lists every setting with its value. The settings are the paper
reference code's for this objective: engine/experiments.py, EXPERIMENTS["mae_gene_program"]."""
from cellssl.engine.recipe import run

if __name__ == "__main__":
    run("mae_gene_program")
