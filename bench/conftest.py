"""pytest-benchmark set-up: `pytest bench --benchmark-only [--quick] --benchmark-json=bench/results.json`, then
`python bench/render.py bench/results.json` prints the tables of bench/README.md.

Sizes: the full run uses the paper's batch of 8,192 cells × 19,350 genes on a 40,000-cell synthetic store; `--quick`
uses 1,024 cells on a 6,000-cell store (a few minutes in all). Stores and peer formats are built once into
`--bench-data` (default bench/data) and reused. Sizes that cannot give a benchmark (a batch larger than the store's
training split, fewer than 2 timed steps) are refused before anything runs.
"""
from __future__ import annotations

from pathlib import Path

import pytest

FULL = {"batch": 8192, "store_cells": 40_000, "steps": 3, "loader_batches": 20, "convert_cells": 50_000}
QUICK = {"batch": 1024, "store_cells": 6_000, "steps": 2, "loader_batches": 8, "convert_cells": 6_000}


def pytest_addoption(parser):
    group = parser.getgroup("cellssl benchmarks")
    group.addoption("--quick", action="store_true", help="small sizes: the whole benchmark in a few minutes")
    group.addoption("--bench-data", default="bench/data", help="where stores and peer formats are built and reused")
    group.addoption("--batch", type=int, help="cells per batch (default: 8,192, or 1,024 with --quick)")
    group.addoption("--steps", type=int, help="timed steps per training benchmark round")


@pytest.fixture(scope="session")
def size(request) -> dict:
    s = dict(QUICK if request.config.getoption("--quick") else FULL)
    for key in ("batch", "steps"):
        if request.config.getoption(f"--{key}"):
            s[key] = request.config.getoption(f"--{key}")
    return s


def pytest_configure(config):
    s = dict(QUICK if config.getoption("--quick") else FULL)
    batch, steps = config.getoption("--batch") or s["batch"], config.getoption("--steps") or s["steps"]
    train = int(s["store_cells"] * 0.8)
    if batch > train:
        raise pytest.UsageError(f"--batch {batch} exceeds the {train:,} training cells of the benchmark store: "
                                f"use --batch {train} or less")
    if steps < 2:
        raise pytest.UsageError(f"--steps {steps}: a training benchmark needs at least 2 timed steps")


@pytest.fixture(scope="session")
def data_dir(request) -> Path:
    path = Path(request.config.getoption("--bench-data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def store(size, data_dir):
    """A synthetic counts store in the default 19,350-gene space, built once and reused."""
    from cellssl.loaders import CellStore
    from cellssl.loaders.synth import synth

    path = data_dir / f"bench-{size['store_cells']}.cellstore"
    if not (path / "zarr.json").is_file():
        synth(path, size["store_cells"], overwrite=True, progress=False)
    return CellStore(path)
