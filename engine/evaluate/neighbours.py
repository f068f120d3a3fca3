"""Exact k nearest neighbours in bounded memory, on the device when there is one: query blocks × reference blocks,
each block's candidates merged into a running top-k. Memory O(query block × block + queries × k), whatever the
cells; the O(queries × references) distance work runs as float32 matrix products (a GPU does scTab's test split
against its validation split, ~10¹³ pairs, in minutes; bench/gpu_check.py times it). float32 only screens: each
block's few nearest by float32 are re-measured in float64 (the distances returned, ties to the lower reference index),
and a float32 error bound proves that no cell left out could have been among the k nearest — where it cannot, the
row's block is measured whole in float64, so the result is that of float64 brute force.
"""
from __future__ import annotations

import numpy as np
import torch

from ..embed import device as default_device

BLOCK = 8192  # reference rows a block
QUERY_BLOCK = 2048  # query rows a block: 2,048 × 8,192 float32 distances, 67 MB
SLACK = 8  # candidates kept beyond k from each block: room between the k-th and the cut for the error bound
# |screened − exact squared distance| ≤ (2·width + 16)·ε·(|q|² + max |r|²), rows centred, ε the screen's unit
# roundoff: the rows and their norms rounded, a dot product of `width` terms summed in any order (γ_width·|q||r|,
# twice), and the two sums; generous, and tested against ties float32 cannot see
EPS = {torch.float32: float(np.finfo(np.float32).eps), torch.float64: float(np.finfo(np.float64).eps)}
WHOLE_ELEMENTS = 1 << 23  # float64 elements at a time where a row's block is measured whole (64 MB)


def _merge(best_d, best_i, d, i, k):
    """The k nearest of two candidate sets, ties to the lower index (a stable sort by index, then by distance)."""
    d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
    by_index = torch.sort(i, dim=1, stable=True).indices
    d, i = d.gather(1, by_index), i.gather(1, by_index)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), i.gather(1, order)


def _expanded(q: torch.Tensor, r: torch.Tensor, q_norms: torch.Tensor, r_norms: torch.Tensor) -> torch.Tensor:
    """Squared distances as |q|² − 2 q·r + |r|², one matrix product (the screen: float32, or float64)."""
    return torch.addmm(r_norms, q, r.T, alpha=-2).add_(q_norms)


def _cut(d: torch.Tensor, k: int, error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k + SLACK smallest of `d` (column indices), and whether the cut provably keeps the k nearest:
    everything left out lies more than twice `error` (the row's bound on |d − exact|) beyond the k-th kept."""
    keep = min(k + SLACK, d.shape[1])
    near, index = torch.topk(d, keep, dim=1, largest=False, sorted=True)
    if keep == d.shape[1]:
        return index, torch.ones(len(d), dtype=torch.bool, device=d.device)
    return index, near[:, -1].double() > near[:, k - 1].double() + 2 * error


def _measured(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """float64 squared distances Σ (q − r)² of each row of q ([rows, width]) to its rows of r ([rows, n, width]): the
    distances returned; equal rows give bit-equal distances wherever they lie, so ties go to the lower index."""
    return (q[:, None, :] - r).square_().sum(2)


def _whole(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """_measured against every row of r, a few query rows at a time (memory: WHOLE_ELEMENTS float64)."""
    step = max(1, WHOLE_ELEMENTS // max(1, r.numel()))
    return torch.cat([_measured(q[a:a + step], r.expand(len(q[a:a + step]), -1, -1)) for a in range(0, len(q), step)])


def nearest(reference: np.ndarray, query: np.ndarray, k: int, block: int = BLOCK, device=None,
            distances: bool = False, query_block: int = QUERY_BLOCK):
    """int64 [len(query), k]: each query row's k nearest reference rows by Euclidean distance, nearest first, ties
    to the lower reference index; with `distances`, (indices, their Euclidean distances as float64). Both are those
    of float64 brute force: each block's distances are screened in float32 and cut to the k + SLACK smallest by a
    selection (not a sort: sorting whole rows cost more than the distances themselves), the kept ones measured in
    float64; a row whose cut the float32 error bound cannot prove safe is screened again in float64, and one that
    not even that settles (ties at the cut) is measured whole."""
    if k < 1 or k > len(reference):
        raise ValueError(f"k must be in [1, {len(reference)}] (the reference rows), got {k}")
    dev = torch.device(device) if device is not None else default_device()
    # the screen runs on centred rows (distances do not move; the norms, and with them its error, shrink); the
    # distances kept are measured on the rows as given
    centre = torch.from_numpy(np.asarray(reference.mean(0, dtype=np.float64)))
    ref32 = torch.empty(reference.shape, dtype=torch.float32)  # block by block: no float64 copy of the reference
    ref_norms = torch.empty(len(reference), dtype=torch.float64)
    for b in range(0, len(reference), block):
        ref32[b:b + block] = torch.from_numpy(np.asarray(reference[b:b + block], np.float64)) - centre
        ref_norms[b:b + block] = ref32[b:b + block].double().square().sum(1)
    bound = 2 * reference.shape[1] + 16
    out = np.empty((len(query), k), np.int64)
    far = np.empty((len(query), k), np.float64) if distances else None
    centre = centre.to(dev)
    with _highest_precision():
        for a in range(0, len(query), query_block):
            q = torch.from_numpy(np.asarray(query[a:a + query_block], np.float64)).to(dev)
            qc = q - centre
            q_norms = qc.square().sum(1)
            q32 = qc.float()
            best_d = torch.full((len(q), 0), 0.0, dtype=torch.float64, device=dev)
            best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=dev)
            for b in range(0, len(reference), block):
                r = torch.from_numpy(np.asarray(reference[b:b + block], np.float64)).to(dev)
                r32, r_norms = ref32[b:b + block].to(dev), ref_norms[b:b + block].to(dev)
                index, safe = _cut(_expanded(q32, r32, q_norms[:, None].float(), r_norms.float()), k,
                                   bound * EPS[torch.float32] * (q_norms + r_norms.max()))
                if not safe.all():  # what float32 cannot settle, float64 may
                    rows = (~safe).nonzero().squeeze(1)
                    rc = r - centre
                    rc_norms = rc.square().sum(1)
                    index[rows], safe[rows] = _cut(_expanded(qc[rows], rc, q_norms[rows, None], rc_norms), k,
                                                   bound * EPS[torch.float64] * (q_norms[rows] + rc_norms.max()))
                unsafe = (~safe).nonzero().squeeze(1)
                if len(unsafe):  # ties at the cut: the whole block, so that the lower index wins among them
                    whole = torch.arange(b, b + len(r), device=dev).expand(len(unsafe), -1)
                    settled = _merge(best_d[unsafe], best_i[unsafe], _whole(q[unsafe], r), whole, k)
                best_d, best_i = _merge(best_d, best_i, _measured(q, r[index]), index + b, k)
                if len(unsafe):
                    best_d[unsafe], best_i[unsafe] = settled
            out[a:a + len(q)] = best_i.cpu().numpy()
            if distances:
                far[a:a + len(q)] = best_d.sqrt().cpu().numpy()
    return (out, far) if distances else out


def self_first(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances) [len(x), k]: each row's k nearest rows of x itself, the row first at distance 0 — the
    form graph libraries (umap, scib-metrics) take precomputed; an earlier duplicate row would otherwise come first."""
    indices, distances = nearest(x, x, min(k, len(x)), distances=True)
    rows = np.arange(len(x))
    is_self = indices == rows[:, None]
    order = np.argsort(~is_self, axis=1, kind="stable")
    indices, distances = np.take_along_axis(indices, order, 1), np.take_along_axis(distances, order, 1)
    absent = ~is_self.any(1)
    indices[absent, 1:], distances[absent, 1:] = indices[absent, :-1], distances[absent, :-1]
    indices[:, 0], distances[:, 0] = rows, 0.0
    return indices, distances


class _highest_precision:
    """float32 products in full float32 inside the block (no TF32 on GPUs, whatever the process set): the error
    bound assumes it."""

    def __enter__(self):
        self.before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.before)


def vote(labels: np.ndarray, neighbours: np.ndarray, n_classes: int) -> np.ndarray:
    """Each row's most frequent neighbour label, ties to the lowest code (numpy's bincount-argmax; scikit-learn's
    KNeighborsClassifier decides ties the same way)."""
    votes = labels[neighbours]
    counts = np.zeros((len(votes), n_classes), np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(votes)), votes.shape[1]), votes.ravel()), 1)
    return counts.argmax(1)
