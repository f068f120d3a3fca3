"""What every recipe shares: its command line, generated from the experiment's config (engine/options.py), then
`train`. Works under `deepspeed recipes/X.py` (which adds --local_rank) and `python recipes/X.py`. A user error
(a typo, a run folder in use, data that does not fit) ends in one line and exit status 2 on every rank."""
from __future__ import annotations

import sys

from .experiments import experiment


def run(name: str, argv: list[str] | None = None) -> None:
    from cellssl.loaders import InputError

    from .options import parse_recipe
    from .trainer import NonFiniteLoss, train

    try:
        cfg = parse_recipe(experiment(name), sys.argv[1:] if argv is None else argv,
                           f"{name}: settings of engine/experiments.py; every one can be overridden")
        path = train(cfg)
    except (InputError, NonFiniteLoss) as exc:  # the user's data or settings: one line, no traceback
        print(f"cellssl: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"model: {path}")
