"""Validation during training: a fixed pass over the same validation cells in the same global batches, with the same
masks and views each time (keyed by the cell), split among the ranks and summed over them, so the score is the same
on any number of ranks; at its own cadence; and which validation the exported model keeps.

`select` names the score that picks the kept model: "val_loss" (lowest), "val_macro_f1" (highest; classifiers) or
"last" (the last step, whatever its scores).
"""
from __future__ import annotations

import math

import torch

from cellssl.loaders import BatchStream, BlockShuffleSampler, CellStore

from .config import TrainConfig
from .feed import Feed

VALIDATION_STEP = 1 << 62  # the randomness key of every validation pass: the same masks and views each time
SELECTIONS = ("val_loss", "val_macro_f1", "last")


def f1_from_confusion(confusion: torch.Tensor) -> dict:
    """Macro F1 over the classes that occur (as truth or prediction) and micro F1, as scikit-learn computes them."""
    tp = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    occurs = (predicted + actual) > 0
    f1 = torch.where(occurs, 2 * tp / (predicted + actual).clamp(min=1), torch.zeros_like(tp))
    return {"val_macro_f1": float(f1[occurs].mean()) if occurs.any() else 0.0,
            "val_micro_f1": float(tp.sum() / confusion.sum().clamp(min=1))}


def validation_sampler(store: CellStore, cfg: TrainConfig, rank: int, world: int):
    """(sampler, note): the first `val_batches` global batches of the validation split (all of it when smaller, or
    when `val_batches` is 0), passed in chunks of `val_batch_size` cells per rank (the micro-batch when 0), the same
    chunks whatever the ranks, each rank a slice of every chunk. Only where the last, shorter chunk has fewer cells
    than there are ranks are those few cells left out (a slice may not be empty). None, and a note saying why, when
    there is no validation split or fewer cells than ranks."""
    if "val" not in store.splits:
        return None, None
    start, stop = store.split("val")
    per_rank = cfg.val_batch_size or cfg.batch_size
    chunk = per_rank * world
    n = stop - start
    if cfg.val_batches:
        n = min(cfg.val_batches * cfg.batch_size * world * cfg.gradient_accumulation, n)
    if 0 < n % chunk < world:
        n -= n % chunk
    if n == 0:
        return None, f"no validation: the val split's {stop - start} cells cannot be shared by {world} ranks"
    return BlockShuffleSampler(start, start + n, per_rank, cfg.seed, rank, world, drop_last=False), None


class Validator:
    """`due(step)` says when; calling it scores one pass over the stream's cells (validation_sampler);
    `improved(scores)` says whether they beat the best so far (a registered part of the checkpoint)."""

    def __init__(self, stream: BatchStream, feed: Feed, every: int, max_steps: int, select: str = "last"):
        if select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, not {select!r}")
        self.stream, self.feed, self.every, self.max_steps = stream, feed, every, max_steps
        self.select = select
        self.best = math.inf if select == "val_loss" else -math.inf

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    @torch.no_grad()
    def __call__(self, engine) -> dict:
        engine.eval()
        model = engine.module
        classes = model.classifier.out_features if hasattr(model, "classifier") else 0
        device = self.feed.device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        confusion = torch.zeros(classes, classes, dtype=torch.float64, device=device)
        self.stream.set_epoch(0)
        for fed in self.feed(self.stream):
            loss, _ = engine(fed.x, fed.labels, VALIDATION_STEP, fed.source.index)
            # weighted by the cells its mean runs over (a classifier's: the labelled ones), so that the score does
            # not depend on how the cells are chunked
            counted = int((fed.labels >= 0).sum()) if classes else len(fed)
            if counted:
                total += torch.tensor([float(loss) * counted, counted], dtype=torch.float64, device=device)
            if classes:
                known = fed.labels >= 0
                pairs = fed.labels[known] * classes + model.logits(fed.x).argmax(1)[known]
                confusion += torch.bincount(pairs, minlength=classes * classes).view(classes, classes).double()
        self.stream.set_epoch(0)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            if classes:
                torch.distributed.all_reduce(confusion)
        engine.train()
        scores = {"val_loss": float(total[0] / total[1]) if total[1] else float("nan")}
        if classes:
            scores.update(f1_from_confusion(confusion.cpu()))
        return scores

    def improved(self, scores: dict) -> bool:
        """Whether `scores` are the best yet by `select` (and remember them); never for "last"."""
        if self.select == "last":
            return False
        value = scores.get(self.select)
        if value is None or not math.isfinite(value):
            return False
        better = value < self.best if self.select == "val_loss" else value > self.best
        if better:
            self.best = value
        return better

    def state_dict(self) -> dict:
        return {"select": self.select, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
