"""Choose the cell store's codec and chunk size by measurement.

For each codec × chunk size, writes the X/indices (uint16), X/data counts (uint16) and X/data log1p (float32)
arrays of a synthetic atlas with the store's own writer settings, then reads them back with zarr-python:
sequentially (whole array) and as random 256-cell blocks (what the block-shuffled loader does). Prints one
markdown table. Usage: python bench/store_codecs.py [--cells 20000]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from cellssl.loaders.genes import GeneSpace
from cellssl.loaders.store import Layout
from cellssl.loaders.synthetic import SyntheticAtlas, SyntheticConfig


def arrays(n_cells: int):
    atlas = SyntheticAtlas(SyntheticConfig(seed=1), GeneSpace.default())
    parts = list(atlas.cells(n_cells))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(p[0]) for p in parts]))])
    indices = np.concatenate([p[1] for p in parts]).astype(np.uint16)
    counts = np.concatenate([p[2] for p in parts])
    lib = np.add.reduceat(counts, indptr[:-1]).astype(np.float32)
    log1p = np.log1p(counts / np.repeat(lib, np.diff(indptr)) * 1e4).astype(np.float32)
    return indptr, {"indices u16": indices, "counts u16": counts.astype(np.uint16), "log1p f32": log1p}


def measure(root: Path, name: str, values: np.ndarray, layout: Layout, indptr: np.ndarray, blocks) -> dict:
    path = root / name.replace(" ", "_")
    t0 = time.perf_counter()
    arr = zarr.create_array(str(path), shape=values.shape, dtype=values.dtype, chunks=(layout.chunk,),
                            shards=(layout.shard,), compressors=layout.compressors(values.dtype), zarr_format=3)
    arr[:] = values
    write_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    arr = zarr.open_array(str(path), mode="r")
    t0 = time.perf_counter()
    arr[:]
    seq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for a, b in blocks:
        n += len(arr[indptr[a]:indptr[b]])
    block_s = time.perf_counter() - t0
    shutil.rmtree(path)
    return {"ratio": values.nbytes / size, "write MB/s": values.nbytes / write_s / 1e6,
            "read MB/s": values.nbytes / seq_s / 1e6, "block MB/s": n * values.itemsize / block_s / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20000)
    args = parser.parse_args()
    indptr, data = arrays(args.cells)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, args.cells - 256, 64)
    blocks = [(int(s), int(s) + 256) for s in starts]
    print(f"{args.cells:,} cells, {len(data['indices u16']):,} nonzeros; shard 2^24 elements; zarr {zarr.__version__}")
    print("| array | codec | chunk | ratio | write MB/s | seq read MB/s | 256-cell block read MB/s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, values in data.items():
            for codec in ("blosc-lz4", "zstd1", "zstd3", "none"):
                for chunk in (1 << 16, 1 << 18, 1 << 20):
                    r = measure(Path(tmp), name, values, Layout(chunk=chunk, codec=codec), indptr, blocks)
                    print(f"| {name} | {codec} | 2^{chunk.bit_length() - 1} | {r['ratio']:.2f} | {r['write MB/s']:.0f} "
                          f"| {r['read MB/s']:.0f} | {r['block MB/s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
