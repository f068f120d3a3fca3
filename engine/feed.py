"""From the loader's batches to the model's input on the training device, as CSR or dense (`--input`).

- csr on CPU: the batch's CSR triplet reaches the objectives as `kernels.SparseRows`; the first layer multiplies
  its kept nonzeros and the losses read their targets from it, so no dense batch is ever made.
- csr on CUDA: the loader leaves counts as stored; each batch's triplet is copied from pinned memory on a side
  CUDA stream one batch ahead of the step (double-buffered), and densified on the device by
  `kernels.csr_to_dense`, log1p per 10k fused where the store holds counts: no host-side dense batch exists.
- dense: the loader densifies on the host (into pinned memory with CUDA); the batch is copied as it is.
"""
from __future__ import annotations

import torch

from cellssl.kernels import SparseRows
from cellssl.loaders import BatchStream, CellStore

INPUTS = ("csr", "dense")


class Feed:
    def __init__(self, input: str, device: torch.device, store: CellStore):
        if input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, not {input!r}")
        self.input, self.device, self.n_genes = input, torch.device(device), store.n_genes
        self.on_device = self.input == "csr" and self.device.type == "cuda"
        self.counts = self.on_device and store.value_kind == "counts"  # normalised while densifying

    def stream(self, store: CellStore, split: str, batch_size: int, seed: int, rank: int, world: int,
               **kw) -> BatchStream:
        """The BatchStream this feed reads (CSR or dense; counts left raw where the GPU normalises them)."""
        return BatchStream(store, split, batch_size, seed, rank, world, output="csr" if self.input == "csr" else
                           "dense", normalize=not self.on_device, **kw)

    def __call__(self, batches):
        """(batch, x) for each batch: x dense on the device, or SparseRows on CPU."""
        if self.on_device:
            yield from self._copied_ahead(batches)
        elif self.input == "csr":
            for batch in batches:
                yield batch, SparseRows(batch.indptr, batch.indices, batch.data, self.n_genes)
        else:
            for batch in batches:
                yield batch, batch.x.to(self.device, non_blocking=True)

    def _copied_ahead(self, batches):
        side = torch.cuda.Stream(self.device)
        pending = None
        for batch in batches:
            with torch.cuda.stream(side):
                parts = [t.to(self.device, non_blocking=True) for t in (batch.indptr, batch.indices, batch.data)]
                done = torch.cuda.Event()
                done.record(side)
            if pending is not None:
                yield self._densify(*pending)
            pending = batch, parts, done
        if pending is not None:
            yield self._densify(*pending)

    def _densify(self, batch, parts, done):
        # the host waits too: the loader reuses this batch's pinned block two batches later, and the copy must be
        # over by then (issued a whole step earlier, it normally is)
        done.synchronize()
        main = torch.cuda.current_stream(self.device)
        for t in parts:
            t.record_stream(main)  # allocated on the side stream, freed after the main stream's use
        return batch, SparseRows(*parts, self.n_genes, counts=self.counts).to_dense()
