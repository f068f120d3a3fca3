"""Helper for tests/test_failures.py (not a test module): a recipe run whose loss turns NaN on one rank only, at one
step, as a bad batch on one node would. Usage: python tests/nan_rank.py RANK STEP EXPERIMENT [recipe options]."""
from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    from cellssl.engine import objectives
    from cellssl.engine.recipe import run

    rank, step, name, *args = argv
    forward = objectives.MaskedAutoencoder.forward

    def poisoned(self, x, labels=None, s=0, cells=None):
        loss, metrics = forward(self, x, labels, s, cells)
        if self.training and os.environ.get("RANK", "0") == rank and s == int(step):
            loss = loss * float("nan")
        return loss, metrics

    objectives.MaskedAutoencoder.forward = poisoned
    run(name, args)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
