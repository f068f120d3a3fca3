"""Where one masked-autoencoder training step spends its time on this machine (batch 8,192, paper network).

Times, as the objective runs them: the mask applied inside the first layer (on CPU the sparse product of the kept
nonzeros; `--dense` switches that off: mask the dense batch, then a dense first layer), the rest of the forward,
the fused loss, backward and AdamW, for a few steps at the given precision.
Usage: python bench/step_profile.py [--precision fp32|bf16] [--steps 3] [--dense]
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from cellssl import kernels
from cellssl.engine.experiments import experiment
from cellssl.engine.setup import build_objective
from cellssl.loaders import BatchStream, CellStore
from cellssl.loaders.synthetic import default_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dense", action="store_true", help="CELLSSL_SPARSE_INPUT=0: the dense first layer")
    args = parser.parse_args()
    if args.dense:
        os.environ["CELLSSL_SPARSE_INPUT"] = "0"
    store = CellStore(default_store())
    objective = build_objective(replace(experiment("mae_random"), precision=args.precision),
                                store)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3, weight_decay=0.01)
    x = next(iter(BatchStream(store, "train", 8192, columns=[]))).x.clone()
    rest = torch.nn.Sequential(*list(objective.encoder)[1:], objective.autoencoder.decoder)
    print(f"MAE random, batch 8192 x {store.n_genes}, {args.precision}, {'dense' if args.dense else 'sparse'} "
          "first layer, seconds per phase")
    print("| step | mask + first layer | rest of forward | loss | backward | AdamW | total |")
    print("|---|---|---|---|---|---|---|")
    for step in range(args.steps + 1):
        t = [time.perf_counter()]
        spec = kernels.mask_spec(x, "random", 0.5, 0, step)
        h = objective.first_layer(objective.encoder, x, spec)
        t.append(time.perf_counter())
        pred = objective.net(rest, h)
        t.append(time.perf_counter())
        loss = kernels.masked_recon_loss(pred, x, spec)
        t.append(time.perf_counter())
        opt.zero_grad()
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if step:  # the first step warms allocators up
            phases = [b - a for a, b in zip(t[:-1], t[1:])]
            print(f"| {step} | " + " | ".join(f"{p:.2f}" for p in phases) + f" | {t[-1] - t[0]:.2f} |")


if __name__ == "__main__":
    main()
