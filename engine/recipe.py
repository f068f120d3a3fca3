"""What every way of training shares: the experiment's command line, generated from its config (engine/options.py),
then `train`. `run` serves the recipe files (`python recipes/X.py`, `deepspeed recipes/X.py`); `run_experiment`
serves `cellssl train X`, `python -m cellssl.train X` and `deepspeed --module cellssl.train X`, which name the
experiment first. The deepspeed launcher's `--local_rank` is accepted. A user error (a typo, a run folder in use,
data that does not fit) ends in one line and exit status 2 on every rank; so does, on the ranks that live to see it,
the loss of another rank."""
from __future__ import annotations

import os
import sys

from .experiments import EXPERIMENTS, experiment


def run(name: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    from cellssl.loaders import InputError

    from .distributed import lost_rank
    from .options import parse_recipe
    from .trainer import NonFiniteLoss, train

    try:
        cfg = parse_recipe(experiment(name), sys.argv[1:] if argv is None else argv,
                           f"{name}: settings of engine/experiments.py; every one can be overridden", prog)
        path = train(cfg)
    except (InputError, NonFiniteLoss) as exc:  # the user's data or settings: one line, no traceback
        print(f"cellssl: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as exc:  # a collective that another rank left: one line on the survivors
        line = lost_rank(exc)
        if line is None:
            raise
        print(f"cellssl: error: {line}", file=sys.stderr, flush=True)
        os._exit(2)  # no teardown: the process group's threads would wait on the lost rank again
    if int(os.environ.get("RANK", "0")) == 0:  # the model is rank 0's export
        print(f"model: {path}")


def _is_launcher_flag(arg: str) -> bool:
    return arg.startswith(("--local_rank", "--local-rank"))


USAGE = ("usage: {prog} EXPERIMENT [options]   (EXPERIMENT --help lists its options)\nexperiments: "
         + ", ".join(EXPERIMENTS))


def run_experiment(argv: list[str], prog: str = "cellssl train") -> None:
    """`argv`: EXPERIMENT then its options (the launcher's --local_rank=N may come first)."""
    names = [i for i, a in enumerate(argv) if not _is_launcher_flag(a)]
    if not names or argv[names[0]] in ("-h", "--help"):
        print(USAGE.format(prog=prog), file=sys.stderr if not names else sys.stdout)
        sys.exit(2 if not names else 0)
    name = argv[names[0]]
    if name not in EXPERIMENTS:
        print(f"cellssl: error: {prog}: unknown experiment {name!r}. Fix: choose one of {', '.join(EXPERIMENTS)}",
              file=sys.stderr)
        sys.exit(2)
    run(name, argv[:names[0]] + argv[names[0] + 1:], prog=f"{prog} {name}")
