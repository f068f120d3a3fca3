"""Recipe: why BYOL collapses in the transfer study (engine/evaluate/byol_check.py): BYOL pretrained on a finished
study's auxiliary store at the given learning rates and target networks, scored as the study scores.
`python recipes/byol_lr_check.py STUDY_DIR [--seeds 0,1,2] [--lrs 0.01,0.001] [--targets ema,frozen] [--out DIR]`;
from an installed wheel: `python -m cellssl.engine.evaluate.byol_check …`."""
from cellssl.engine.evaluate.byol_check import main

if __name__ == "__main__":
    main(prog="byol_lr_check.py")
