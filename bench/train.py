"""End-to-end training throughput per objective, beside the compute ceiling and a paper-style step.

For each objective: cells/s of full training steps (BatchStream batches → objective forward → backward → AdamW),
the batches reaching the model as CSR and as dense (`--input`), at batch 8,192 on this machine (a GPU where there is one); the ceiling, i.e. the dense network's matmul FLOPs per
step (counted by torch's FlopCounterMode with the sparse first layer switched off: the model's FLOPs, not the
fewer that our CPU path multiplies) at the matmul rate measured in the same run; and a faithful paper-style step
that does the per-element work as the reference code did (Bernoulli mask tensors, numpy programme masks built per
batch, torch.distributions NB noise, unfused loss). Usage: python bench/train.py [--steps 3] [--batch-size 8192]
[--data STORE] [--precision fp32|bf16] [--only byol,...]
"""
from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from paper_style import eager_nb_augment, eager_programme_mask
from torch.utils.flop_counter import FlopCounterMode

from cellssl.engine.experiments import experiment
from cellssl.engine.feed import Feed
from cellssl.engine.objectives import view_coins
from cellssl.engine.setup import build_objective
from cellssl.loaders import BatchStream, CellStore
from cellssl.loaders.synthetic import default_store

OBJECTIVES = [("mae random", "mae_random"), ("mae gene programme", "mae_gene_program"), ("mae gp→tf", "mae_gp_to_tf"),
              ("byol", "byol"), ("barlow twins", "barlow_twins")]  # table row, experiment-registry name


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(batch: int, n_genes: int, dtype=torch.float32) -> float:
    """FLOP/s of this machine's matmul in `dtype` at the first layer's shape (the step's dominant product)."""
    a, b = torch.randn(batch, n_genes, dtype=dtype, device=DEVICE), torch.randn(n_genes, 512, dtype=dtype, device=DEVICE)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    sync()
    return 3 * 2 * batch * n_genes * 512 / (time.perf_counter() - t0)


def paper_style(objective, name: str, members, x: torch.Tensor, step: int) -> torch.Tensor:
    """The reference implementation's per-element work around the same networks."""
    ae = objective.autoencoder
    if name.startswith("mae random"):
        mask = torch.bernoulli(torch.full_like(x, 0.5))
        pred = ae(x * (1 - mask) / 0.5)
        return ((pred - x) ** 2 * mask).sum() / x.numel()
    if name.startswith("mae gene"):
        x_in = eager_programme_mask(x, members)
        masked = (x_in == 0) & (x != 0)
        pred = ae(x_in)
        return ((pred - x) ** 2 * masked).sum() / x.numel()
    if name.startswith("mae gp"):
        return None  # the reference code has no GP→TF on this scale to compare with
    views = []
    for view in range(2 if name == "byol" else 1):  # ours' augmentation decisions, done the reference's way
        v = x
        noise, drop = view_coins(objective.seed, step, view, 0.5 if name == "byol" else 1.0)
        if noise:
            v = eager_nb_augment(v)
        if drop:
            v = v * torch.bernoulli(torch.full_like(v, 0.9)) / 0.9
        views.append(v)
    if name == "byol":
        def pair(a, b):
            p = F.normalize(objective.predictor(objective.projector(objective.encoder(a))), dim=1)
            with torch.no_grad():
                z = F.normalize(objective.target_projector(objective.target_encoder(b)), dim=1)
            return (2 - 2 * (p * z).sum(1)).mean()
        return pair(views[0], views[1]) + pair(views[1], views[0])
    z1, z2 = objective.projector(objective.encoder(views[0])), objective.projector(objective.encoder(x))
    z1, z2 = (z1 - z1.mean(0)) / z1.std(0), (z2 - z2.mean(0)) / z2.std(0)
    c = z1.T @ z2 / x.shape[0]
    return (torch.diagonal(c) - 1).pow(2).sum() + objective.lambd * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())


def stepper(loss_fn, objective, opt, store, batch_size: int, input: str = "dense"):
    """One training step per call (batch → loss → backward → AdamW), batches reaching the model as `input`
    (engine/feed.py); returns its seconds, the wait for the batch included."""
    feed = Feed(input, DEVICE, store)
    batches = feed(feed.stream(store, "train", batch_size, 0, 0, 1, columns=[]).endless())  # small stores: few/epoch
    steps = itertools.count()

    def step() -> float:
        t0 = time.perf_counter()
        _, x = next(batches)
        loss = loss_fn(x, next(steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.after_step()
        sync()
        return time.perf_counter() - t0
    return step


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
    parser.add_argument("--only", default=None, help="comma-separated rows, e.g. 'byol,mae random'")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="ours and the ceiling in this precision; the paper-style step stays fp32, as it was")
    args = parser.parse_args()
    store = CellStore(args.data or default_store())
    rate = matmul_rate(args.batch_size, store.n_genes, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    print(f"{store.path.name}: batch {args.batch_size} x {store.n_genes} genes, {args.steps} timed steps after one, "
          f"torch {torch.__version__}, {DEVICE.type if DEVICE.type == 'cpu' else torch.cuda.get_device_name()}, "
          f"{torch.get_num_threads()} threads, {args.precision} matmul {rate / 1e9:.0f} GFLOP/s")
    print("| objective | ours, CSR input cells/s | ours, dense input cells/s | ceiling cells/s | CSR / ceiling | "
          "paper-style cells/s | CSR / paper | dense / paper |")
    print("|---|---|---|---|---|---|---|---|")
    for name, registered in OBJECTIVES:
        if args.only and name not in args.only.split(","):
            continue
        cfg = replace(experiment(registered), precision=args.precision)  # the recipe's own settings
        ocfg = cfg.objective
        torch.manual_seed(0)
        objective = build_objective(cfg, store).to(DEVICE)
        x = next(iter(BatchStream(store, "train", args.batch_size, seed=0, columns=[]))).x.clone().to(DEVICE)
        os.environ["CELLSSL_SPARSE_INPUT"] = "0"
        with FlopCounterMode(display=False) as counter:
            objective(x, None, 0)[0].backward()
        os.environ.pop("CELLSSL_SPARSE_INPUT")
        ceiling = args.batch_size / (counter.get_total_flops() / rate)
        members = None
        if ocfg.name == "mae" and ocfg.mask == "gene_program":
            from cellssl.engine.setup import programme_file
            from cellssl.loaders.genesets import index_programmes, read_gmt

            members = index_programmes(read_gmt(programme_file(cfg, store, "programmes.gmt")), store.genes).members
        opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
        ours = lambda xb, i: objective(xb, None, i)[0]  # noqa: E731
        steppers = {kind: stepper(ours, objective, opt, store, args.batch_size, kind) for kind in ("csr", "dense")}
        if paper_style(objective, name, members, x[:16], 0) is not None:
            def paper_step(xb, i):
                objective.compute_dtype = None  # the reference ran in fp32
                loss = paper_style(objective, name, members, xb, i)
                objective.compute_dtype = torch.bfloat16 if args.precision == "bf16" else None
                return loss
            steppers["paper"] = stepper(paper_step, objective, opt, store, args.batch_size)
        rates = interleaved(steppers, args.batch_size, args.steps)
        ours, paper = {k: rates[k] for k in ("csr", "dense")}, rates.get("paper", float("nan"))
        print(f"| {name} | {ours['csr']:,.0f} | {ours['dense']:,.0f} | {ceiling:,.0f} | {ours['csr'] / ceiling:.0%} | "
              f"{paper:,.0f} | {ours['csr'] / paper:.1f}x | {ours['dense'] / paper:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
