"""How random are block-shuffled batches? Per-batch label mix versus the split's global mix.

For each block size, runs the loader's sampler (BlockShuffleSampler, buffer of 2 batches) over the train split
and reports the mean total-variation distance between each batch's cell-type (and dataset) distribution and
the split's, next to block size 1 (fully random batches). Two row orders: the store as written (shuffled
within the split at conversion) and the same cells sorted by dataset then cell type, i.e. an atlas
concatenated dataset by dataset as published, had it not been shuffled. Reads only obs.
Usage: python bench/randomness.py STORE [--batch-size 8192] [--epochs 2]
"""
from __future__ import annotations

import argparse

import numpy as np

from cellssl.loaders import CellStore
from cellssl.loaders.sampler import BlockShuffleSampler


def mean_tv(codes: np.ndarray, batches: list[np.ndarray], n_classes: int) -> float:
    overall = np.bincount(codes, minlength=n_classes) / len(codes)
    tvs = [0.5 * np.abs(np.bincount(codes[b], minlength=n_classes) / len(b) - overall).sum() for b in batches]
    return float(np.mean(tvs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    store = CellStore(args.store)
    start, stop = store.split("train")
    labels = {c: store.obs_codes(c)[start:stop] for c in ("cell_type", "dataset_id")}
    sizes = {c: int(v.max()) + 1 for c, v in labels.items()}
    orders = {"store order (shuffled at conversion)": np.arange(stop - start),
              "dataset-sorted order (unshuffled atlas)": np.lexsort((labels["cell_type"], labels["dataset_id"]))}
    print(f"{store.path.name}: train split {stop - start:,} cells, batch {args.batch_size}, buffer 2 batches, "
          f"{args.epochs} epochs; mean total-variation distance of a batch's mix from the split's")
    print("| row order | block size | cell type TV | dataset TV |")
    print("|---|---|---|---|")
    for name, perm in orders.items():
        for block in (1, 16, 64, 256, 1024, 4096, 16384):
            sampler = BlockShuffleSampler(0, stop - start, args.batch_size, seed=0, block_size=block, buffer_batches=2)
            batches = [perm[rows] for e in range(args.epochs) for _, rows in sampler.batches(e)]
            tv = {c: mean_tv(v, batches, sizes[c]) for c, v in labels.items()}
            print(f"| {name} | {block} | {tv['cell_type']:.4f} | {tv['dataset_id']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
