"""Why the loader reads chunks itself, and why blocks of 1,024 rows: random row blocks decoded per second.

Reads 32,768 cells as random blocks of 64, 256 and 1,024 consecutive rows, through zarr-python
(`CellStore.read_rows`, one call per block and array) and through the loader's direct chunk reader
(`ShardedArray`, each needed chunk decoded once, 2 threads). Usage: python bench/block_reads.py STORE
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cellssl.loaders import CellStore
from cellssl.loaders.chunks import ShardedArray

CELLS = 32768


def main() -> None:
    store = CellStore(sys.argv[1])
    arrays = [ShardedArray(store.path / "X" / name) for name in ("indices", "data")]
    pool = ThreadPoolExecutor(2)
    rng = np.random.default_rng(0)
    print(f"{store.path.name}: {CELLS:,} cells per measurement, warm page cache")
    print("| block rows | zarr-python read_rows cells/s | direct chunk reader cells/s | ratio |")
    print("|---|---|---|---|")
    for block in (64, 256, 1024):
        starts = rng.permutation(store.n_cells // block)[:CELLS // block] * block
        t0 = time.perf_counter()
        for s in starts:
            store.read_rows(int(s), int(s) + block)
        zarr_rate = len(starts) * block / (time.perf_counter() - t0)
        ranges = np.stack([store.indptr[starts], store.indptr[starts + block]], axis=1)
        t0 = time.perf_counter()
        for a in arrays:
            a.read(ranges, pool)
        direct_rate = len(starts) * block / (time.perf_counter() - t0)
        print(f"| {block} | {zarr_rate:,.0f} | {direct_rate:,.0f} | {direct_rate / zarr_rate:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
