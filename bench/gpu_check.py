"""One prepared check for a CUDA machine (meant to finish well inside 8 minutes on one GPU):

1. compiles every Triton launch the dispatchers make (kernels/variants.py) natively for this device;
2. compares each kernel with its torch reference on realistic shapes (batch 8,192 × 19,350 genes): max error, time;
3. trains each objective of the experiment registry for 20 steps with the Trainer's own step (`Trainer.train_step`,
   through DeepSpeed, exactly what a run does) from a cell store through the CSR path (CSR batches copied to the
   device on their own stream, densified there by `csr_to_dense`): cells/s, bytes moved per batch (CSR vs the
   dense batch), and the model FLOPs utilisation against the device's measured bf16 matmul peak;
4. times batch assembly from a shard resident on the device (`BatchStream(resident="device")`, each batch densified
   where it lies by `kernels.csr_rows_to_dense` with log1p fused): cells/s, and its share of each objective's step;
5. times the evaluation's exact blocked kNN on the device (engine/evaluate/neighbours.py) on 64-d embeddings
   (100,000 queries × 1,000,000 references), checked against a brute-force top-k on a sample: pairs/s, from which
   scTab's test × validation split (~3.4 M × ~2.1 M) can be projected;

and writes everything as one JSON (`--out`, default $OUT/gpu_check.json when $OUT is set, else
bench/gpu_check.json). `--smoke` runs the same code on CPU at toy sizes (Triton through its interpreter): the test
suite uses it so that the script cannot rot on machines without a GPU.
Usage: python bench/gpu_check.py [--steps 20] [--cells 8192] [--genes 19350] [--store PATH] [--out FILE]
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["CELLSSL_KERNELS"] = "triton"

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cellssl import kernels  # noqa: E402
from cellssl.engine.experiments import EXPERIMENTS, PRETRAINING  # noqa: E402
from cellssl.engine.flops import matmul_peak  # noqa: E402
from cellssl.engine.trainer import Trainer  # noqa: E402
from cellssl.kernels import variants  # noqa: E402
from cellssl.kernels.csr_to_dense import csr_to_dense_reference  # noqa: E402
from cellssl.kernels.masking import mask_reference, pack_bits  # noqa: E402
from cellssl.kernels.nb_augment import nb_augment_reference, nb_noise  # noqa: E402
from cellssl.kernels.recon_loss import recon_loss_reference  # noqa: E402
from cellssl.loaders import TARGET_SUM  # noqa: E402


def timed(fn, device, repeats: int = 5) -> float:
    """Median seconds of `fn` (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compile_native(device) -> list[dict]:
    if device.type != "cuda":
        return [{"name": "native compile", "skipped": "no CUDA device"}]
    major, minor = torch.cuda.get_device_capability()
    out = []
    for name, error in variants.compile_all(major * 10 + minor):
        out.append({"name": name, "ok": error is None, **({"error": error} if error else {})})
    return out


def kernel_checks(device, cells: int, genes: int) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.poisson(torch.rand(cells, genes, generator=gen) ** 8 * 3, generator=gen)
    x = torch.log1p(counts / counts.sum(1, keepdim=True).clamp(min=1) * TARGET_SUM).to(device)
    pred = x + 0.1 * torch.randn(cells, genes, generator=gen).to(device)
    flags = torch.zeros(64, genes, dtype=torch.bool)
    for p in range(64):
        flags[p, torch.randperm(genes, generator=gen)[:max(1, genes // 100)]] = True
    bits = pack_bits(flags).to(device)
    csr = counts.to_sparse_csr()
    indptr, indices, data = (csr.crow_indices().to(device), csr.col_indices().to(torch.int32).to(device),
                             csr.values().to(device))
    rows = []

    def check(name, ours, reference):
        got, want = ours(), reference()
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        error = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
        rows.append({"name": name, "max_abs_error": error, "seconds": timed(ours, device),
                     "reference_seconds": timed(reference, device)})

    spec = kernels.mask_spec(x, "gene_program", 0.5, 0, 1, bits)
    check("gene-programme mask", lambda: kernels.apply_mask(x, spec), lambda: mask_reference(x, spec))
    for kind, s in (("random", kernels.mask_spec(x, "random", 0.5, 0, 1)), ("gene-programme", spec)):
        check(f"masked loss ({kind})", lambda s=s: kernels.masked_recon_loss(pred, x, s),
              lambda s=s: recon_loss_reference(pred, x, s)[0])
    raw = nb_noise(x, 0, 1)
    check("NB augmentation", lambda: kernels.nb_augment(x, 0.1, 0, 1, TARGET_SUM),
          lambda: nb_augment_reference(x, 0.1, raw, TARGET_SUM))
    check("CSR → dense + log1p", lambda: kernels.csr_to_dense(indptr, indices, data, genes, TARGET_SUM),
          lambda: csr_to_dense_reference(indptr, indices, data, genes, TARGET_SUM))
    return rows


def objective_checks(device, store_path: str, steps: int, batch: int, peak: float) -> list[dict]:
    """Each pretraining objective for `steps` timed steps of `Trainer.train_step` after one untimed step."""
    rows = []
    for name in PRETRAINING:
        cfg = replace(EXPERIMENTS[name], data=str(store_path), batch_size=batch, max_steps=10**9,
                      precision="bf16" if device.type == "cuda" else "fp32")
        trainer = Trainer(cfg)
        batches = trainer.batches()
        trainer.train_step(next(batches), 0)  # compiles the kernels, warms the allocator
        sync(device)
        started = time.perf_counter()
        for step in range(1, steps + 1):
            micro = next(batches)
            metrics = trainer.train_step(micro, step)
        sync(device)
        seconds = time.perf_counter() - started
        source = micro[-1].source
        cells_per_s = steps * batch / seconds
        rows.append({"objective": name, "cells_per_s": cells_per_s, "loss": metrics["loss"],
                     "bytes_per_batch_csr": sum(t.numel() * t.element_size() for t in (source.indptr, source.indices,
                                                                                        source.data)),
                     "bytes_per_batch_dense": batch * trainer.store.n_genes * 4,
                     "share_of_matmul_peak": cells_per_s * trainer.flops_per_cell / peak,
                     "residence": trainer.stream.residence})
        del trainer, batches
    return rows


def resident_assembly(device, store_path: str, batch: int, batches: int) -> dict:
    """Cells/s of batches drawn from a device-resident shard and densified there (what a resident run's feed does
    before each step), checked once against the torch reference."""
    from cellssl.kernels.csr_to_dense import csr_rows_to_dense_reference
    from cellssl.loaders import BatchStream

    stream = BatchStream(store_path, "train", batch, seed=0, columns=[], normalize=False, resident="device",
                         device=device)
    shard, n_genes = stream.load_share(), stream.store.n_genes
    it = stream.endless()

    def assemble():
        b = next(it)
        return kernels.csr_rows_to_dense(shard.indptr, shard.indices, shard.data, b.rows, n_genes, TARGET_SUM), b

    x, b = assemble()
    reference = csr_rows_to_dense_reference(shard.indptr, shard.indices, shard.data, b.rows, n_genes, TARGET_SUM)
    error = float((x - reference).abs().max())
    sync(device)
    started = time.perf_counter()
    for _ in range(batches):
        assemble()
    sync(device)
    return {"cells_per_s": batches * batch / (time.perf_counter() - started), "max_abs_error": error,
            "shard_gb": (shard.indptr.nbytes + shard.indices.nbytes + shard.data.nbytes) / 1e9}


def knn_throughput(device, queries: int, references: int) -> dict:
    """Exact blocked kNN (k = 6: the paper's 5 plus the dropped first) of random 64-d embeddings on the device."""
    from cellssl.engine.evaluate.neighbours import nearest

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((references, 64)).astype(np.float32)
    query = rng.standard_normal((queries, 64)).astype(np.float32)
    sync(device)
    started = time.perf_counter()
    found = nearest(ref, query, 6, device=device)
    sync(device)
    seconds = time.perf_counter() - started
    sample = torch.from_numpy(query[:100]).double()
    brute = torch.cdist(sample, torch.from_numpy(ref).double()).topk(6, largest=False).values
    ours = torch.from_numpy(np.linalg.norm(ref[found[:100]] - query[:100, None].astype(np.float64), axis=2))
    return {"queries": queries, "references": references, "seconds": seconds,
            "pairs_per_s": queries * references / seconds, "matches_brute_force": bool(torch.allclose(ours, brute))}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cells", type=int, default=8192)
    p.add_argument("--genes", type=int, default=19350)
    p.add_argument("--store", help="a cell store (default: a synthetic one made in a temporary folder)")
    p.add_argument("--out", default=str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT")
                   else str(Path(__file__).with_name("gpu_check.json")))
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU (Triton interpreted): for the test suite")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("gpu_check: no CUDA device; run it on a GPU machine (or with --smoke to try it on CPU)")
    if args.smoke:
        args.cells, args.genes, args.steps = 16, 96, 2
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    report["compile"] = compile_native(device)
    report["kernels"] = kernel_checks(device, args.cells, args.genes)
    report["matmul_peak_flops"] = peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        store_path = args.store
        if store_path is None:
            from cellssl.loaders.synth import synth

            genes = Path(tmp) / "genes.txt"
            if args.smoke:
                from cellssl.loaders import GeneSpace

                genes.write_text("\n".join(GeneSpace.default().gene_id[:3000]))
            store_path = synth(Path(tmp) / "s.cellstore", 400 if args.smoke else 4 * args.cells,
                               genes=genes if args.smoke else "default", progress=False)
        batch = 64 if args.smoke else args.cells
        report["objectives"] = objective_checks(device, store_path, args.steps, batch, peak)
        report["resident_assembly"] = assembly = resident_assembly(device, store_path, batch, 4 * args.steps)
        for row in report["objectives"]:  # the step's time that goes to assembling its batch
            row["assembly_share_of_step"] = row["cells_per_s"] / assembly["cells_per_s"]
    report["knn"] = knn_throughput(device, *((200, 1000) if args.smoke else (100_000, 1_000_000)))
    report["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
