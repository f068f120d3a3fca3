"""Cell-type prediction, the paper's headline task: a linear probe and kNN on frozen embeddings (fit on the
train split, scored on the test split), fine-tuning through the engine (the supervised objective with the encoder
started from a pretrained model, or from scratch: the no-pretraining baseline), and the score the paper reports
(`paper_knn`: kNN among the validation cells as the reference computes it, hierarchy-corrected where the store
has a cell-type hierarchy). Macro F1 is the headline."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cellssl.loaders import CellStore, InputError

from ..checkpoint import load_model
from ..config import TrainConfig
from ..embed import check_genes, map_split
from ..embed import device as default_device
from ..objectives import Supervised
from .inputs import labels
from .metrics import f1_scores
from .neighbours import nearest, vote
from .threads import one_thread


def _labelled(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(z) != len(y):
        raise ValueError(f"{len(z):,} embeddings but {len(y):,} labels: they must describe the same cells")
    keep = y >= 0
    return z[keep], y[keep]


PROBE_CELLS = 200_000  # a larger train split is subsampled (seeded): the probe's score settles long before


def linear_probe(z_train, y_train, z_test, y_test, names=None, seed: int = 0, max_cells: int = PROBE_CELLS,
                 block: int = 65_536, device=None) -> dict:
    """Multinomial logistic regression on standardised embeddings, the objective scikit-learn's LogisticRegression
    minimises by default (mean cross-entropy + ‖W‖² / (2·C·n), C = 1, intercepts free), fitted by full-batch L-BFGS
    in float64 with its loss and gradient summed over blocks of `block` cells, stopped as scikit-learn stops (tol
    1e-4): memory the standardised cells (at most `max_cells` × width float64) and O(block × classes), on the device
    when there is one. Train splits larger than `max_cells` are subsampled (seeded); `fitted_on` says how many cells
    it saw."""
    (z_train, y_train), (z_test, y_test) = _labelled(z_train, y_train), _labelled(z_test, y_test)
    if len(z_train) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(len(z_train), max_cells, replace=False))
        z_train, y_train = z_train[keep], y_train[keep]
    dev = torch.device(device) if device is not None else default_device()
    classes, codes = np.unique(y_train, return_inverse=True)
    n, width = z_train.shape
    mean = torch.from_numpy(z_train.mean(0, dtype=np.float64)).to(dev)
    scale = torch.from_numpy(z_train.std(0, dtype=np.float64)).to(dev)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # as StandardScaler: a constant column stays
    y = torch.from_numpy(codes.astype(np.int64)).to(dev)
    w = torch.zeros(width, len(classes), dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, device=dev, requires_grad=True)

    def rows(z, a):
        return (torch.from_numpy(np.asarray(z[a:a + block], np.float64)).to(dev) - mean) / scale

    # standardised once, not at every evaluation of the objective: at most max_cells × width float64 (100 MB)
    x = torch.cat([rows(z_train, a) for a in range(0, n, block)]) if n else torch.zeros(0, width, dtype=torch.float64,
                                                                                            device=dev)

    def objective():
        optimiser.zero_grad()
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for a in range(0, n, block):
            loss = torch.nn.functional.cross_entropy(x[a:a + block] @ w + b, y[a:a + block], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        penalty = w.square().sum() / (2 * n)
        penalty.backward()
        return total + penalty.detach()

    # scikit-learn's stopping rule (tol 1e-4 on the largest gradient entry; iterations capped at 2,000, as before)
    optimiser = torch.optim.LBFGS([w, b], lr=1, max_iter=2000, tolerance_grad=1e-4, tolerance_change=1e-12,
                                  history_size=10, line_search_fn="strong_wolfe")
    if len(classes) > 1:
        with one_thread(dev, rows=min(n, block)):
            optimiser.step(objective)
    with torch.no_grad():
        predicted = np.concatenate([(rows(z_test, a) @ w + b).argmax(1).cpu().numpy()
                                    for a in range(0, len(z_test), block)]) if len(z_test) else np.zeros(0, np.int64)
    return {**f1_scores(y_test, classes[predicted], names), "fitted_on": n}


def knn(z_train, y_train, z_test, y_test, names=None, k: int = 5) -> dict:
    """Zero-shot: each test cell takes the majority label of its k nearest train cells (Euclidean, exact and
    blocked: evaluate/neighbours.py)."""
    (z_train, y_train), (z_test, y_test) = _labelled(z_train, y_train), _labelled(z_test, y_test)
    found = nearest(z_train, z_test, min(k, len(z_train)))
    return f1_scores(y_test, vote(y_train, found, _classes(y_train, y_test)), names)


def _classes(*labels: np.ndarray) -> int:
    return int(max(y.max() for y in labels if len(y))) + 1


def hierarchy_corrected(y_true: np.ndarray, y_pred: np.ndarray, children: list[list[int]] | None) -> np.ndarray:
    """A prediction of a child of the true type counts as the true type (the reference's correct_labels)."""
    if not children:
        return y_pred
    n = len(children)
    is_child = np.zeros((n, n), bool)
    for parent, kids in enumerate(children):
        is_child[parent, kids] = True
    inside = (y_true >= 0) & (y_true < n) & (y_pred >= 0) & (y_pred < n)
    fixed = y_pred.copy()
    hit = inside & is_child[np.where(inside, y_true, 0), np.where(inside, y_pred, 0)]
    fixed[hit] = y_true[hit]
    return fixed


def paper_knn(z_val, y_val, z_test, y_test, names=None, k: int = 5, children: list[list[int]] | None = None) -> dict:
    """The cell-type score the paper reports, computed as its reference code does (tester/classifier/kNN.py): the
    k + 1 nearest validation cells of each test cell (exact Euclidean, as faiss's IndexFlatL2), the first dropped
    as if it were the cell itself (it is not: validation and test cells are disjoint), a majority vote of the other
    k (ties to the lowest label code, as numpy's bincount-argmax), then the hierarchy correction and scikit-learn's
    macro average."""
    (z_val, y_val), (z_test, y_test) = _labelled(z_val, y_val), _labelled(z_test, y_test)
    if len(z_val) < 2:
        raise ValueError(f"the paper's kNN needs at least 2 labelled validation cells, got {len(z_val)}")
    found = nearest(z_val, z_test, min(k + 1, len(z_val)))[:, 1:]
    predicted = hierarchy_corrected(y_test, vote(y_val, found, _classes(y_val, y_test)), children)
    return {**f1_scores(y_test, predicted, names), "k": k, "hierarchy_corrected": bool(children)}


MICRO_BATCH = 2048  # fine-tuning's cells per forward pass (training and validation): the memory it needs


def finetune(store: CellStore, label: str, out: Path, init: Path | None, steps: int, batch_size: int = 16384,
             seed: int = 0, precision: str = "fp32", classifier: str = "reference",
             lr_step_epochs: int | None = None) -> Path:
    """Fine-tune (or, without `init`, train from scratch) the whole network on the store's train split through the
    engine. `classifier`: "reference" — the reference's network and protocol (EXPERIMENTS["finetune"] from a
    pretrained encoder, ["supervised"] from scratch: ReLU classifier, class-weighted cross-entropy, AdamW lr 9e-4,
    weight decay 0.05, dropout 0 from a pretrained encoder and 0.1 from scratch, the step with the best validation
    loss exported); "selu" — ours (the "_selu" experiments: the encoder's own SELU network, best validation macro
    F1). The batch is capped at the train split and passes in micro-batches of at most MICRO_BATCH cells (the batch
    rounded down to a multiple of their count; one pass where the encoder has BatchNorm); the kept model is chosen on
    the whole validation split (the reference validates on all of it). `lr_step_epochs`: the StepLR period, the
    experiment's if None. An unfinished earlier attempt in `out` is started again. Returns the exported model."""
    from ..experiments import EXPERIMENTS
    from ..trainer import train

    if classifier not in ("reference", "selu"):
        raise ValueError(f"classifier must be 'reference' or 'selu', not {classifier!r}")
    start, stop = store.split("train")
    batch = min(batch_size, stop - start)
    base = EXPERIMENTS[("finetune" if init else "supervised") + ("_selu" if classifier == "selu" else "")]
    model = base.model
    if init is not None:  # the pretrained encoder's widths and norm; the classifier's activation, block and dropout
        pretrained = TrainConfig.from_dict(json.loads(load_model(init)["config"])).model
        model = replace(base.model, hidden=pretrained.hidden, latent=pretrained.latent, norm=pretrained.norm)
    # the batch in micro-batches: the loss is a sum over cells (BatchNorm aside), so the step is the same, and memory
    # follows the micro-batch
    parts = 1 if model.norm == "batch" else -(-batch // MICRO_BATCH)
    cfg = replace(base, data=str(store.path), out=str(out), objective=replace(base.objective, label=label),
                  model=model, batch_size=batch // parts, gradient_accumulation=parts, max_steps=steps, seed=seed,
                  precision=precision, val_batches=0, val_batch_size=0 if parts == 1 else MICRO_BATCH,
                  lr_step_epochs=lr_step_epochs or base.lr_step_epochs,
                  init_encoder=str(init) if init else None, log_every=max(1, steps // 10),
                  val_every=max(1, steps // 10), checkpoint_every=steps, overwrite=True,
                  resident="off")  # streamed: a few steps must not first read the whole split into memory
    return train(cfg)


def classify(model_path: Path, store: CellStore, split: str, label: str) -> tuple[np.ndarray, list[str]]:
    """A supervised model's predictions for every cell of a split, as codes of the store's `label` categories, and
    the names of the codes: a class the store lacks (the model was trained on another store) gets a code of its own
    after the store's, so it counts as a wrong prediction, never as the store's class of the same number."""
    saved = load_model(model_path)
    if "classifier.weight" not in saved["state_dict"]:
        raise ValueError(f"{model_path} holds no classifier: fine-tune it (recipes/finetune.py) first")
    check_genes(store, saved["gene_ids"], model_path)
    cfg = TrainConfig.from_dict(json.loads(saved["config"]))
    model = Supervised(len(saved["gene_ids"]), cfg.model, saved["state_dict"]["classifier.weight"].shape[0])
    model.load_state_dict(saved["state_dict"])
    model.to(default_device()).eval()
    predicted = map_split(store, split, lambda x, _: model.logits(x).argmax(1)).astype(np.int64)
    names = [str(c) for c in store.categories[label]]
    classes = saved["classes"]
    if classes is None:  # models exported before class names were kept: codes of the training store
        if len(names) != saved["state_dict"]["classifier.weight"].shape[0]:
            raise InputError(model_path, f"a classifier of {saved['state_dict']['classifier.weight'].shape[0]} "
                             f"classes without their names, scored on {len(names)} {label!r} categories",
                             "fine-tune it again with this cellssl (models now keep their class names)")
        return predicted, names
    foreign = [c for c in classes if c not in names]
    names += foreign
    code = {c: i for i, c in enumerate(names)}
    return np.array([code[c] for c in classes], np.int64)[predicted], names


def finetuned_scores(model_path: Path, store: CellStore, label: str, split: str = "test") -> dict:
    """F1 of the fine-tuned classifier's predictions, and the fine-tuning budget behind the kept model."""
    y = labels(store, label, split)
    with torch.no_grad():
        predicted, names = classify(model_path, store, split, label)
    keep = y >= 0
    return {**f1_scores(y[keep], predicted[keep], names), "trained": load_model(model_path)["trained"]}
