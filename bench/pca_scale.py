"""The streamed PCA's fit alone, seconds per 1,000 train cells, on the eval_scale benchmark's stores, sizes side by
side in one process (so that a drifting machine moves every size alike): is its cost per cell flat as the cells grow?
Usage: python bench/pca_scale.py [--cells 100000,1000000,100000] [--folder bench/data/eval_scale]
(the stores are bench/eval_scale.py's: run it first at those sizes)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cellssl.engine.evaluate.pca import StreamedPCA
from cellssl.loaders import CellStore

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="100000,1000000,100000")
    parser.add_argument("--folder", default=str(ROOT / "bench" / "data" / "eval_scale"))
    args = parser.parse_args()
    print("| cells | train cells | fit, s | s / 1,000 train cells |\n|---:|---:|---:|---:|")
    for n in [int(c) for c in args.cells.split(",")]:
        store = CellStore(Path(args.folder) / f"s{n}.cellstore")
        start, stop = store.split("train")
        began = time.perf_counter()
        StreamedPCA().fit(store, "train", progress=False)
        seconds = time.perf_counter() - began
        print(f"| {n:,} | {stop - start:,} | {seconds:.1f} | {1000 * seconds / (stop - start):.3f} |", flush=True)


if __name__ == "__main__":
    main()
