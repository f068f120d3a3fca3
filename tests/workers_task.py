"""Tasks for tests/test_workers.py, importable by spawned worker processes (not a test module)."""
from __future__ import annotations

import os
import time

from cellssl.loaders.errors import CellStoreError


def refuse(i, ticks):
    if i == 1:
        raise CellStoreError("h5ad X/indices", f"gene column 19355 outside [0, 19350) at cell {700 + i}",
                             "reconvert the source")
    return i


def die(i, ticks):
    if i == 1:
        os._exit(9)  # as if killed
    time.sleep(0.5)
    return i


def sleep(i, ticks):
    time.sleep(600)
