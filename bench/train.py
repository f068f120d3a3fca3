"""End-to-end training throughput per objective, beside the compute ceiling and a paper-style step.

For each objective: cells/s of the Trainer's own training step (`Trainer.train_step`: BatchStream batches → the
objective → backward → clipping → optimiser, through DeepSpeed, exactly what a run does) with the batches reaching
the model as CSR and as dense (`--input`), at batch 8,192 on this machine (a GPU where there is one); the ceiling,
i.e. the dense network's matmul FLOPs per cell (engine/flops.py) at the matmul rate measured in the same run; and a
faithful paper-style step (bench/paper_style.py: the reference's per-element work around the same networks, run by
the same Trainer). Usage: python bench/train.py [--steps 3] [--batch-size 8192] [--data STORE]
[--precision fp32|bf16] [--only byol,...]
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import replace

import torch
from paper_style import PAPER_STYLE, PaperStyle

from cellssl.engine.experiments import experiment
from cellssl.engine.flops import matmul_peak
from cellssl.engine.setup import build_objective, programme_file
from cellssl.engine.trainer import Trainer
from cellssl.loaders import CellStore
from cellssl.loaders.genesets import index_programmes, read_gmt
from cellssl.loaders.synthetic import default_store

OBJECTIVES = ("mae_random", "mae_gene_program", "mae_gp_to_tf", "byol", "barlow_twins")  # experiment-registry names


def paper_style_objective(cfg, store: CellStore, name: str) -> PaperStyle:
    """The reference's per-element work around a fresh copy of the objective's networks."""
    members = None
    if name == "mae_gene_program":
        members = index_programmes(read_gmt(programme_file(cfg, store, "programmes.gmt")), store.genes).members
    torch.manual_seed(cfg.seed)
    return PaperStyle(build_objective(cfg, store), name, members)


def trainers(name: str, data: str, batch_size: int, precision: str = "fp32") -> dict[str, Trainer]:
    """Trainers of one objective with the registry's settings: ours with CSR and with dense input, and the
    paper-style step where the reference has one (fp32, dense input, as it ran)."""
    cfg = replace(experiment(name), data=data, batch_size=batch_size, precision=precision, max_steps=10**9)
    out = {kind: Trainer(replace(cfg, input=kind)) for kind in ("csr", "dense")}
    if name in PAPER_STYLE:
        paper = replace(cfg, input="dense", precision="fp32")
        out["paper"] = Trainer(paper, paper_style_objective(paper, out["dense"].store, name))
    return out


def stepper(trainer: Trainer):
    """One `train_step` per call; returns its seconds, the wait for the batch included."""
    batches, step = trainer.batches(), [0]

    def run() -> float:
        t0 = time.perf_counter()
        trainer.train_step(next(batches), step[0])
        step[0] += 1
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        return time.perf_counter() - t0
    return run


def interleaved(steppers: dict, batch_size: int, steps: int) -> dict[str, float]:
    """cells/s of each stepper over `steps` steps after an untimed first one, taken in turn (one step of each per
    round): this host's speed drifts by tens of percent over minutes, and turns make the drift hit every path alike."""
    seconds = dict.fromkeys(steppers, 0.0)
    for round in range(steps + 1):
        for name, step in steppers.items():
            took = step()
            seconds[name] += took if round else 0.0
    return {name: steps * batch_size / t for name, t in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--data", default=None)
    parser.add_argument("--only", default=None, help="comma-separated registry names, e.g. 'byol,mae_random'")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="ours and the ceiling in this precision; the paper-style step stays fp32, as it was")
    args = parser.parse_args()
    data = str(args.data or default_store())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    store = CellStore(data)
    print(f"{store.path.name}: batch {args.batch_size} x {store.n_genes} genes, {args.steps} timed steps after one, "
          f"torch {torch.__version__}, {device.type if device.type == 'cpu' else torch.cuda.get_device_name()}, "
          f"{torch.get_num_threads()} threads, {args.precision} matmul {peak / 1e9:.0f} GFLOP/s; Trainer.train_step")
    print("| objective | ours, CSR input cells/s | ours, dense input cells/s | ceiling cells/s | CSR / ceiling | "
          "paper-style cells/s | CSR / paper | dense / paper |")
    print("|---|---|---|---|---|---|---|---|")
    for name in OBJECTIVES:
        if args.only and name not in args.only.split(","):
            continue
        built = trainers(name, data, args.batch_size, args.precision)
        rates = interleaved({k: stepper(t) for k, t in built.items()}, args.batch_size, args.steps)
        ceiling = peak / built["csr"].flops_per_cell
        paper = rates.get("paper", float("nan"))
        print(f"| {name} | {rates['csr']:,.0f} | {rates['dense']:,.0f} | {ceiling:,.0f} | {rates['csr'] / ceiling:.0%} "
              f"| {paper:,.0f} | {rates['csr'] / paper:.1f}x | {rates['dense'] / paper:.1f}x |", flush=True)
        del built
        gc.collect()


if __name__ == "__main__":
    main()
