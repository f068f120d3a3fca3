"""scib-metrics' BRAS on 1,200 random cells (32 dimensions, 40 labels of skewed sizes, 3 batches), cold, jitted or
op by op (`jax.disable_jit()`): whether running it without jit gets around its per-label-size compilation.
Usage: python bench/bras_jit.py {jit,nojit}   (one mode a process: each must start with nothing compiled)"""
from __future__ import annotations

import sys
import time

import jax
import numpy as np
import scib_metrics


def main(mode: str) -> None:
    rng = np.random.default_rng(0)
    n, d = 1200, 32
    labels = np.sort(rng.choice(40, n, p=np.arange(1, 41) / 820))
    x = rng.standard_normal((n, d)).astype(np.float32) + labels[:, None] * 0.1
    batch = rng.integers(0, 3, n)
    started = time.perf_counter()
    if mode == "nojit":
        with jax.disable_jit():
            value = scib_metrics.bras(x, labels, batch)
    else:
        value = scib_metrics.bras(x, labels, batch)
    print(f"{mode}: BRAS {value:.4f} in {time.perf_counter() - started:.1f} s "
          f"({len(np.unique(np.bincount(labels)))} distinct label sizes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "jit")
