"""Statistics over the global batch: sums across ranks that gradients flow through, and the few reductions a run
needs besides DeepSpeed's gradient all-reduce (a flag, a metric, a decision).

A run is one experiment on any number of ranks only if every statistic that couples the cells of a batch (BatchNorm,
Barlow Twins' standardisation and cross-correlation, the class-weighted cross-entropy's normaliser) spans the global
batch. `global_sum` is an all-reduce whose backward all-reduces the gradient (torch.distributed.nn), so a rank's
gradient includes what its cells contribute to every other rank's loss through the shared statistic: with each rank's
loss its share of the global loss, DeepSpeed's gradient average is the gradient of the global loss. With one process
every function here is the identity. Imports no other engine module.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `t`, differentiable (the gradient of each rank's copy is summed back to every rank)."""
    if world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of a value no gradient flows through (in place; returned)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` holds on any rank: every rank takes the same branch after it."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Each metric averaged over the ranks (every rank holds an equal share of the global batch)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, count) of each column over the global batch, differentiable; float32 whatever the
    input's dtype (autocast leaves normalisation in float32 too). Each rank's moments come from one fused pass
    (var_mean), are turned into sums, all-reduced, and turned back."""
    x = x.float()
    n = x.new_tensor([float(x.shape[0])])
    var, mean = torch.var_mean(x, 0, correction=0) if x.shape[0] else (torch.zeros_like(x[0]), torch.zeros_like(x[0]))
    total = global_sum(torch.cat([mean * n, (var + mean.square()) * n, n]))
    width = x.shape[1]
    count = total[-1]
    mean = total[:width] / count
    var = (total[width:2 * width] / count - mean.square()).clamp(min=0.0)
    return mean, var, count
