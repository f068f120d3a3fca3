"""Exact k nearest neighbours in bounded memory, on the device when there is one: query blocks × reference blocks,
each block's candidates merged into a running top-k. Memory O(query block × block + queries × k), whatever the
cells; the O(queries × references) distance work runs as matrix products (a GPU does scTab's test split against its
validation split, ~10¹³ pairs, in minutes; bench/gpu_check.py times it). Distances in float64, as scikit-learn's brute force
computes them for float32 input, ties to the lower reference index.
"""
from __future__ import annotations

import numpy as np
import torch

from ..embed import device as default_device

BLOCK = 8192  # reference rows a block
QUERY_BLOCK = 2048  # query rows a block: 2,048 × 8,192 float64 distances, 134 MB
SLACK = 8  # candidates kept beyond k from each block, so that ties at the k-th place are seen


def _merge(best_d, best_i, d, i, k):
    """The k nearest of two candidate sets, ties to the lower index (a stable sort by index, then by distance)."""
    d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
    by_index = torch.sort(i, dim=1, stable=True).indices
    d, i = d.gather(1, by_index), i.gather(1, by_index)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), i.gather(1, order)


def nearest(reference: np.ndarray, query: np.ndarray, k: int, block: int = BLOCK, device=None,
            distances: bool = False, query_block: int = QUERY_BLOCK):
    """int64 [len(query), k]: each query row's k nearest reference rows by Euclidean distance, nearest first, ties
    to the lower reference index; with `distances`, (indices, their Euclidean distances as float64). Each block of
    distances is cut to its k + SLACK smallest by a selection (not a sort: sorting whole rows cost more than the
    distances themselves); a row whose ties reach past the slack is merged whole, so the result stays exact."""
    if k < 1 or k > len(reference):
        raise ValueError(f"k must be in [1, {len(reference)}] (the reference rows), got {k}")
    dev = torch.device(device) if device is not None else default_device()
    ref = torch.from_numpy(np.ascontiguousarray(reference, np.float64))
    out = np.empty((len(query), k), np.int64)
    far = np.empty((len(query), k), np.float64) if distances else None
    ref_norms = ref.square().sum(1)
    for a in range(0, len(query), query_block):
        q = torch.from_numpy(np.ascontiguousarray(query[a:a + query_block], np.float64)).to(dev)
        q_norms = q.square().sum(1, keepdim=True)
        best_d = torch.full((len(q), 0), 0.0, dtype=torch.float64, device=dev)
        best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=dev)
        for b in range(0, len(ref), block):
            r = ref[b:b + block].to(dev)
            d = (q_norms - 2 * q @ r.T + ref_norms[b:b + block].to(dev)).clamp_(min=0)
            keep = min(k + SLACK, d.shape[1])
            if keep < d.shape[1]:
                near_d, near_i = torch.topk(d, keep, dim=1, largest=False, sorted=True)
                tied = near_d[:, -1] <= near_d[:, k - 1]  # the k-th distance recurs at the edge: ties cut off
                if tied.any():
                    rows = tied.nonzero().squeeze(1)
                    whole = torch.arange(b, b + len(r), device=dev).expand(len(rows), -1)
                    fixed = _merge(best_d[rows], best_i[rows], d[rows], whole, k)
                near_i = near_i + b
                best_d, best_i = _merge(best_d, best_i, near_d, near_i, k)
                if tied.any():
                    best_d[rows], best_i[rows] = fixed
            else:
                whole = torch.arange(b, b + len(r), device=dev).expand(len(q), -1)
                best_d, best_i = _merge(best_d, best_i, d, whole, k)
        out[a:a + len(q)] = best_i.cpu().numpy()
        if distances:
            far[a:a + len(q)] = best_d.sqrt().cpu().numpy()
    return (out, far) if distances else out


def vote(labels: np.ndarray, neighbours: np.ndarray, n_classes: int) -> np.ndarray:
    """Each row's most frequent neighbour label, ties to the lowest code (numpy's bincount-argmax; scikit-learn's
    KNeighborsClassifier decides ties the same way)."""
    votes = labels[neighbours]
    counts = np.zeros((len(votes), n_classes), np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(votes)), votes.shape[1]), votes.ravel()), 1)
    return counts.argmax(1)
