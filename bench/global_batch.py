"""What "many ranks, one experiment" costs a training step: the keyed dropout (masks regenerated from the cell's
store row) and the global BatchNorm (moments summed explicitly so they can be all-reduced), against torch's
nn.Dropout and nn.BatchNorm1d in the same networks, per objective, through the Trainer's own `train_step`.

In one process the global statistics are the local ones and torch's fused layers compute them; `--as-ranks` makes the
layers take their several-rank path (moments summed and all-reduced, here over a group of one), which times the work
a rank does beyond torch's layers on a real launch. The bytes they all-reduce per step on several ranks are printed
beside (the gradients' all-reduce, which DeepSpeed does either way, for scale).
Usage: python bench/global_batch.py [--steps 3] [--batch-size 8192] [--data STORE] [--only byol,...] [--as-ranks]
"""
from __future__ import annotations

import argparse
import gc
from dataclasses import replace

import torch
from torch import nn
from train import OBJECTIVES, interleaved, stepper

from cellssl.engine.experiments import experiment
from cellssl.engine.models import CellDropout, GlobalBatchNorm
from cellssl.engine.setup import build_objective
from cellssl.engine.trainer import Trainer
from cellssl.loaders import CellStore
from cellssl.loaders.synthetic import default_store


def with_torch_layers(module: nn.Module) -> nn.Module:
    """The same network with torch's per-process dropout and BatchNorm in place of ours (weights kept)."""
    for name, child in list(module.named_children()):
        if isinstance(child, CellDropout):
            setattr(module, name, nn.Dropout(child.p))
        elif isinstance(child, GlobalBatchNorm):
            plain = nn.BatchNorm1d(child.num_features, child.eps, child.momentum, child.affine)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            with_torch_layers(child)
    return module


def reduced_bytes(objective: nn.Module, batch: int) -> int:
    """Bytes our statistics all-reduce per step (forward and backward): 2 × (2 · width + 1) floats per BatchNorm
    pass, and Barlow Twins' standardisation (two views) and cross-correlation."""
    norms = [m.num_features for m in objective.modules() if isinstance(m, GlobalBatchNorm)]
    passes = 2 if hasattr(objective, "target_projector") else 1  # BYOL: online and target networks
    total = sum(2 * (2 * w + 1) for w in norms) * passes
    projector = getattr(objective, "projector", None)
    if type(objective).__name__ == "BarlowTwins" and projector is not None:
        width = [m for m in projector if isinstance(m, nn.Linear)][-1].out_features
        total += 2 * 2 * (2 * width + 1) + 2 * width * width
    return 4 * total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--data", default=None)
    parser.add_argument("--only", default=None)
    parser.add_argument("--as-ranks", action="store_true", help="the layers' several-rank path")
    args = parser.parse_args()
    if args.as_ranks:
        from cellssl.engine import collective, models

        collective.world_size = models.world_size = lambda: 2  # the path of a launch; the group is this process
    data = str(args.data or default_store())
    store = CellStore(data)
    print(f"{store.path.name}: batch {args.batch_size} x {store.n_genes} genes, {args.steps} timed steps after one, "
          f"taken in turns; torch {torch.__version__}, {torch.get_num_threads()} threads; Trainer.train_step")
    print("| objective | ours cells/s | torch layers cells/s | cost of ours | all-reduced by ours / step | "
          "gradient all-reduce / step |")
    print("|---|---|---|---|---|---|")
    for name in OBJECTIVES:
        if args.only and name not in args.only.split(","):
            continue
        cfg = replace(experiment(name), data=data, batch_size=args.batch_size, max_steps=10**9)
        ours = Trainer(cfg)
        torch.manual_seed(cfg.seed)
        plain = Trainer(cfg, with_torch_layers(build_objective(cfg, store)))
        rates = interleaved({"ours": stepper(ours), "torch": stepper(plain)}, args.batch_size, args.steps)
        grads = 4 * sum(p.numel() for p in ours.objective.parameters() if p.requires_grad)
        print(f"| {name} | {rates['ours']:,.0f} | {rates['torch']:,.0f} | {rates['torch'] / rates['ours'] - 1:+.1%} | "
              f"{reduced_bytes(ours.objective, args.batch_size) / 1e6:.2f} MB | {grads / 1e6:.0f} MB |", flush=True)
        del ours, plain
        gc.collect()


if __name__ == "__main__":
    main()
