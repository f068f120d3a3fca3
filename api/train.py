"""`python -m cellssl.train EXPERIMENT [options]` (one process) or `deepspeed --module cellssl.train EXPERIMENT
[options]` (every GPU, every node): train an experiment of the registry (engine/experiments.py) from the installed
package, with the same options as its recipe (`python -m cellssl.train mae_random --help`). The deepspeed launcher
inserts its `--local_rank=N` before the experiment; it is accepted anywhere."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from cellssl.engine.recipe import run_experiment

    run_experiment(sys.argv[1:] if argv is None else argv, prog="cellssl.train")


if __name__ == "__main__":
    main()
