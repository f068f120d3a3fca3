"""Where one masked-autoencoder training step spends its time on this machine (batch 8,192, paper network).

Profiles `Trainer.train_step` (the step a run takes) with torch.profiler and reports its labelled phases: the mask
applied inside the first layer (on CPU the sparse product of the kept nonzeros; `--dense` switches that off: a dense
first layer on the masked batch), the rest of the forward, the fused loss, backward, and the optimiser step (DeepSpeed's
clipping and AdamW), for a few steps at the given precision.
Usage: python bench/step_profile.py [--precision fp32|bf16] [--steps 3] [--dense] [--data STORE]
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

from torch.profiler import ProfilerActivity, profile

from cellssl.engine.experiments import experiment
from cellssl.engine.trainer import Trainer
from cellssl.loaders.synthetic import default_store

PHASES = ("mask + first layer", "rest of forward", "loss", "backward", "optimizer step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--data", default=None)
    parser.add_argument("--dense", action="store_true", help="CELLSSL_SPARSE_INPUT=0: the dense first layer")
    args = parser.parse_args()
    if args.dense:
        os.environ["CELLSSL_SPARSE_INPUT"] = "0"
    cfg = replace(experiment("mae_random"), data=str(args.data or default_store()), batch_size=args.batch_size,
                  precision=args.precision, max_steps=10**9)
    trainer = Trainer(cfg)
    batches = trainer.batches()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    print(f"MAE random, batch {args.batch_size} x {trainer.store.n_genes}, {args.precision}, "
          f"{'dense' if args.dense else 'sparse'} first layer, seconds per phase of Trainer.train_step")
    print("| step | " + " | ".join(PHASES) + " | total |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for step in range(args.steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            trainer.train_step(batch, step)
        total = time.perf_counter() - t0
        seconds = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PHASES}
        if step:  # the first step warms allocators up
            print(f"| {step} | " + " | ".join(f"{seconds.get(p, 0.0):.2f}" for p in PHASES) + f" | {total:.2f} |")


if __name__ == "__main__":
    main()
