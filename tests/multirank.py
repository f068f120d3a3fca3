"""Helper for tests/test_multirank.py (not a test module): trains several experiments one after another in one launch, as their recipes do
(one process, or every rank of a `deepspeed`/`torchrun` launch), each into OUT/NAME, so that one launch covers every
objective. Usage: python tests/multirank.py STORE OUT BATCH ACCUMULATION STEPS NAME[:extra,options] ...
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from cellssl.engine.recipe import run

    store, out, batch, accumulation, steps, *names = argv
    for item in names:
        name, _, extra = item.partition(":")
        args = ["--data", store, "--out", f"{out}/{name}", "--batch-size", batch, "--gradient-accumulation",
                accumulation, "--max-steps", steps, "--log-every", "1", "--val-every", "3", "--val-batches", "1",
                "--checkpoint-every", "3", "--hidden", "48,32", "--latent", "16", "--trace",
                *[a for a in extra.split(",") if a]]
        run(name, args)  # as a recipe: a user error ends the launch in one line, exit 2


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
