"""What every cellssl command line sets before torch loads its OpenMP thread pool: threads that sleep between
parallel regions instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless the user chose a policy). On a machine another
job keeps busy, spinning threads of one process wait on each other's time slices: a small MLP's step took 10× longer
(bench/README.md, "Threads on a busy machine"); on an idle machine the difference is within noise."""
from __future__ import annotations

import os


def settle_threads() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
