"""From the loader's batches to the model's input on the training device, as CSR or dense (`--input`).

- csr on CPU: the batch's CSR triplet reaches the objectives as `kernels.SparseRows`; the first layer multiplies
  its kept nonzeros and the losses read their targets from it, so no dense batch is ever made.
- csr on CUDA: the loader leaves counts as stored; each batch's triplet is copied from pinned memory on a side
  CUDA stream one batch ahead of the step (double-buffered), and densified on the device by
  `kernels.csr_to_dense`, log1p per 10k fused where the store holds counts: no host-side dense batch exists.
- dense: the loader densifies on the host (into pinned memory with CUDA); the batch is copied as it is.
- a shard resident on the device (`--resident`): the batch names rows of the shard, and `kernels.csr_rows_to_dense`
  densifies them where they lie (log1p per 10k fused for counts): the step needs nothing from the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cellssl.kernels import SparseRows, csr_rows_to_dense
from cellssl.loaders import TARGET_SUM, Batch, BatchStream, CellStore

INPUTS = ("csr", "dense")


@dataclass
class Fed:
    """One batch on the training device: the model's input `x` (dense, or SparseRows on CPU), the labels the run
    predicts (None when it predicts none) and the loader's batch it came from (`source`: index, epoch, step)."""

    x: torch.Tensor | SparseRows
    labels: torch.Tensor | None
    source: Batch

    def __len__(self) -> int:
        return len(self.source)


class Feed:
    def __init__(self, input: str, device: torch.device, store: CellStore, label: str | None = None,
                 kept: int = 1):
        """`kept`: batches the consumer uses at once (micro-batches accumulated into one step): on CPU they are read
        in the loader's ring, which must not reuse their buffers before then."""
        if input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, not {input!r}")
        self.input, self.device, self.n_genes = input, torch.device(device), store.n_genes
        self.label = label if label in store.obs_columns else None
        self.on_device = self.input == "csr" and self.device.type == "cuda"
        self.counts_total = TARGET_SUM if store.value_kind == "counts" else None  # what device densifying needs
        # a GPU step reads copies; the host only waits for the copy of the batch it has read ahead (two held)
        self.held = 2 if self.device.type == "cuda" else kept
        # counts are normalised while densifying on the device: the loader leaves them as stored
        self.target_sum = TARGET_SUM if self.on_device and store.value_kind == "counts" else None

    def stream(self, store: CellStore, split: str, sampler, resident: str = "off", reserve: int = 0) -> BatchStream:
        """The BatchStream this feed reads with `sampler` (CSR or dense; counts left raw where the GPU normalises
        them; resident where `resident` says, on this feed's device when it is a GPU)."""
        return BatchStream(store, split, sampler=sampler, output="csr" if self.input == "csr" else "dense",
                           normalize=self.target_sum is None, pin_memory=self.device.type == "cuda", held=self.held,
                           columns=[self.label] if self.label else [], resident=resident,
                           device=self.device if self.device.type == "cuda" or resident == "device" else None,
                           reserve=reserve, progress=sampler.rank == 0)

    def __call__(self, batches):
        """A `Fed` for each loader batch."""
        if self.on_device:
            yield from self._copied_ahead(batches)
        else:
            for batch in batches:
                yield self._fed(batch, self._input(batch))

    def _input(self, batch: Batch):
        """The model's input from a batch the host can hand over as it is (no asynchronous copy)."""
        if batch.resident is not None:
            shard = batch.resident
            return csr_rows_to_dense(shard.indptr, shard.indices, shard.data, batch.rows, self.n_genes,
                                     self.counts_total)
        if self.input == "csr":
            return SparseRows(batch.indptr, batch.indices, batch.data, self.n_genes)
        return batch.x.to(self.device, non_blocking=True)

    def _fed(self, batch: Batch, x) -> Fed:
        labels = batch.obs.get(self.label) if self.label else None
        return Fed(x, None if labels is None else labels.to(self.device, non_blocking=True), batch)

    def _copied_ahead(self, batches):
        side = torch.cuda.Stream(self.device)
        pending = None
        for batch in batches:
            if batch.resident is not None:  # already on the device: nothing to copy ahead
                yield self._fed(batch, self._input(batch))
                continue
            with torch.cuda.stream(side):
                parts = [t.to(self.device, non_blocking=True) for t in (batch.indptr, batch.indices, batch.data)]
                done = torch.cuda.Event()
                done.record(side)
            if pending is not None:
                yield self._densify(*pending)
            pending = batch, parts, done
        if pending is not None:
            yield self._densify(*pending)

    def _densify(self, batch, parts, done) -> Fed:
        # the host waits too: the loader reuses this batch's pinned block two batches later, and the copy must be
        # over by then (issued a whole step earlier, it normally is)
        done.synchronize()
        main = torch.cuda.current_stream(self.device)
        for t in parts:
            t.record_stream(main)  # allocated on the side stream, freed after the main stream's use
        return self._fed(batch, SparseRows(*parts, self.n_genes, target_sum=self.target_sum).to_dense())
