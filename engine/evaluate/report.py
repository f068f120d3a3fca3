"""results.json → results.md (the training budget behind each model, then frozen-embedding scores and fine-tuned
scores in separate tables, each column explained, then per-class F1) and PNG plots: a UMAP of each embedding
coloured by cell type and by batch, and per-class F1 bars."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

# (header, task, path into that task's entry, what it measures)
FROZEN = [
    ("probe F1", "cell_type", ("linear_probe", "macro_f1"),
     "macro F1 of a logistic regression on the frozen embedding, fitted on the train split"),
    ("paper kNN F1", "cell_type", ("paper_knn", "macro_f1"),
     "**the score the paper reports**, computed as its reference code does: each test cell takes the majority label of "
     "its k + 1 nearest *validation* cells less the nearest one (dropped as a \"self-match\"), corrected through the "
     "cell-type hierarchy where the store or --child-matrix has one (a predicted child of the true type counts as "
     "right), scored with scikit-learn's macro average"),
    ("kNN F1 (train)", "cell_type", ("knn", "macro_f1"),
     "ours: macro F1 of the majority label of each test cell's k nearest *train* cells, nothing dropped, no "
     "hierarchy (zero-shot: no fitting at all)"),
    ("expl. var.", "reconstruction", ("all", "variance_weighted"),
     "variance-weighted explained variance of the reconstructed log1p expression (models with a trained decoder)"),
    ("expl. var. per batch", "reconstruction", ("all", "per_batch_mean"),
     "the same computed per batch of 1,024 test cells and averaged over the batches, as the reference reports it "
     "(batches see less variance than the split: usually lower)"),
    ("expl. var. masked", "reconstruction", ("masked", "variance_weighted"),
     "the same on the positions of a random mask, reconstructed from the rest"),
    ("protein r", "cross_modality", ("frozen", "pearson_per_feature"),
     "Pearson r per paired feature (e.g. protein) of an MLP head on the frozen embedding"),
    ("scIB batch", "integration", ("batch_correction",), "scIB batch-correction score (higher: batches mixed)"),
    ("scIB bio", "integration", ("bio_conservation",), "scIB bio-conservation score (higher: cell types kept apart)"),
    ("scIB total", "integration", ("total",), "0.4 · batch + 0.6 · bio"),
]
FINETUNED = [
    ("paper kNN F1", "cell_type", ("finetune", "paper_knn", "macro_f1"),
     "the paper's score (above) on the fine-tuned network's embedding: how the paper scores fine-tuned models"),
    ("macro F1", "cell_type", ("finetune", "macro_f1"),
     "ours: macro F1 (each cell type counts once) of the fine-tuned classifier's own predictions (argmax), no "
     "hierarchy"),
    ("micro F1", "cell_type", ("finetune", "micro_f1"), "micro F1 (each cell counts once) of the same"),
    ("protein r per feature", "cross_modality", ("finetuned", "pearson_per_feature"),
     "Pearson r per paired feature, encoder and head trained together"),
    ("protein r per cell", "cross_modality", ("finetuned", "pearson_per_cell"), "the same per cell, across features"),
]


def lookup(results: dict, task: str, name: str, path: tuple[str, ...]):
    value = results.get(task, {}).get(name)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _budget(trained: dict | None) -> str:
    if not trained:
        return "–"
    return f"{trained['steps']:,} steps, {trained['epochs']:.3g} epochs, {trained['cells_seen']:,} cells"


def budget_table(results: dict) -> list[str]:
    lines = ["What each representation was trained with (cells seen count repeats over epochs):", "",
             "| representation | objective | pretraining | fine-tuning (cell type) |", "|---|---|---|---|"]
    for name, r in results["representations"].items():
        pre = {"pca": "fitted on the train split", "supervised": "none: trained from scratch on the target"}.get(
            r.get("objective"), _budget(r.get("trained"))) if r["kind"] == "baseline" else _budget(r.get("trained"))
        fine = _budget(lookup(results, "cell_type", name, ("finetune", "trained")))
        lines.append(f"| {name} | {r.get('objective', '?')} | {pre} | {fine} |")
    return lines


def score_table(results: dict, title: str, columns: list) -> list[str]:
    names = list(results["representations"])
    columns = [c for c in columns if any(lookup(results, c[1], n, c[2]) is not None for n in names)]
    if not columns:
        return []
    lines = ["", title, "", "| representation | " + " | ".join(c[0] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in names:
        label = f"{name} *(baseline)*" if results["representations"][name]["kind"] == "baseline" else name
        values = [lookup(results, task, name, path) for _, task, path, _ in columns]
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in values) + " |")
    return lines + [""] + [f"- **{header}**: {what}" for header, _, _, what in columns]


def markdown(results: dict) -> str:
    lines = [f"Evaluation of `{results['store']}` (label `{results['label']}`; heads and probes fitted on the train "
             "split, every score on the test split)", "", *budget_table(results),
             *score_table(results, "Frozen embeddings (the pretrained encoder as it is):", FROZEN),
             *score_table(results, "Fine-tuned (the encoder trained further on the target's train split):", FINETUNED)]
    for task, why in results.get("skipped", {}).items():
        lines.append(f"\n{task} skipped: {why}")
    if results.get("missing"):
        lines.append(f"\n**Unfinished** (`cellssl eval … --resume` completes it): {', '.join(results['missing'])}")
    lines += per_class_table(results)
    return "\n".join(lines) + "\n"


def per_class_scores(results: dict) -> dict[str, tuple[str, dict[str, float]]]:
    """F1 per class of each representation: fine-tuned where it was, else the linear probe (said beside it)."""
    return {name: ("fine-tuned", r["finetune"]["per_class_f1"]) if "finetune" in r else
            ("linear probe", r["linear_probe"]["per_class_f1"]) for name, r in results.get("cell_type", {}).items()}


def per_class_table(results: dict) -> list[str]:
    if not results.get("cell_type"):
        return []
    scores = per_class_scores(results)
    names = list(scores)
    support = next(iter(results["cell_type"].values()))["linear_probe"]["support"]
    classes = sorted({c for _, s in scores.values() for c in s}, key=lambda c: -support.get(c, 0))
    lines = ["", "Per-class F1 on the test split, classes by test support:", "",
             "| cell type | test cells | " + " | ".join(f"{n} ({how})" for n, (how, _) in scores.items()) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for c in classes:
        lines.append(f"| {c} | {support.get(c, 0)} | " + " | ".join(
            "–" if c not in scores[n][1] else f"{scores[n][1][c]:.3f}" for n in names) + " |")
    return lines


def palette() -> list:
    """60 distinguishable colours: tab20's pairs, then tab20b and tab20c, in an order that puts unlike hues next."""
    import matplotlib.pyplot as plt

    colours = []
    for name in ("tab20", "tab20b", "tab20c"):
        shades = plt.get_cmap(name).colors
        colours += [shades[i] for i in range(0, 20, 2)] + [shades[i] for i in range(1, 20, 2)]
    return colours


def _scatter(ax, xy: np.ndarray, codes: np.ndarray, names: list[str], size: float) -> None:
    """Cells coloured by category, every category its own colour, named in a legend beside the axes (by size). With
    more categories than the palette's 60 colours the rarest share grey ("other"), drawn first with unlabelled cells
    so that they stay in the background."""
    colours = palette()
    present, counts = np.unique(codes[codes >= 0], return_counts=True)
    shown = present[np.argsort(-counts, kind="stable")]
    shown = shown if len(shown) <= len(colours) else shown[:len(colours) - 1]
    rest = ~np.isin(codes, shown)
    if rest.any():
        label = f"other ({len(present) - len(shown)} rarer)" if len(present) > len(shown) else "unlabelled"
        ax.scatter(*xy[rest].T, color="lightgrey", s=size, linewidths=0, rasterized=True, label=label)
    for i, code in enumerate(shown):
        chosen = codes == code
        ax.scatter(*xy[chosen].T, color=colours[i], s=size, linewidths=0, rasterized=True,
                   label=f"{names[code]} ({chosen.sum():,})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6 if len(shown) > 20 else 7,
              markerscale=max(1.0, 12 / size), frameon=False, ncol=1 + len(shown) // 30)


NEIGHBOURS = 15  # umap's default


def _umap(cells: np.ndarray, seed: int) -> np.ndarray:
    """2-d UMAP coordinates, its neighbour graph from our exact kNN: umap's own search compiled for seconds (numba)
    on a few cells, and is approximate (NN-descent) on many."""
    import umap

    from . import compile_cache
    from .neighbours import self_first

    compile_cache.numba_functions()
    indices, distances = self_first(cells, NEIGHBOURS)
    with warnings.catch_warnings():  # no search index to transform new cells with: none is needed
        warnings.simplefilter("ignore", UserWarning)
        return umap.UMAP(n_neighbors=NEIGHBOURS, random_state=seed, n_jobs=1,
                         precomputed_knn=(indices, distances.astype(np.float32), None)).fit_transform(cells)


def plots(results: dict, embeddings: dict[str, np.ndarray], labels: np.ndarray, label_names: list[str],
          batch: np.ndarray | None, folder: Path, seed: int = 0, max_cells: int = 10_000,
          batch_names: list[str] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    keep = np.arange(len(labels))
    if len(keep) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_cells, replace=False))
    colourings = [("cell type", labels[keep], label_names)]
    if batch is not None:
        colourings.append(("batch", batch[keep], batch_names or [str(b) for b in range(int(batch.max()) + 1)]))
    size = float(np.clip(30_000 / len(keep), 2, 20))
    for name, z in embeddings.items():
        xy = _umap(np.ascontiguousarray(z[keep], np.float32), seed)
        fig, axes = plt.subplots(1, len(colourings), figsize=(10 * len(colourings), 6), squeeze=False)
        for ax, (title, codes, names) in zip(axes[0], colourings):
            _scatter(ax, xy, codes, names, size)
            ax.set(title=f"{name}: coloured by {title}", xticks=[], yticks=[])
        path = folder / f"umap_{_slug(name)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends beside the axes included
        plt.close(fig)
        written.append(str(path))
    groups: dict[str, dict[str, dict]] = {}  # fine-tuned networks and frozen-embedding probes: separate panels
    for name, (how, values) in per_class_scores(results).items():
        groups.setdefault(how, {})[name] = values
    if groups:
        classes = sorted({c for group in groups.values() for scores in group.values() for c in scores},
                         key=label_names.index)
        most = max(len(group) for group in groups.values())
        fig, axes = plt.subplots(len(groups), 1, figsize=(max(8, 0.3 * len(classes) * most ** 0.5), 4.5 * len(groups)),
                                 squeeze=False)
        for ax, (how, group) in zip(axes[:, 0], sorted(groups.items())):
            width = 0.8 / len(group)
            for i, (name, scores) in enumerate(group.items()):
                ax.bar(np.arange(len(classes)) + i * width, [scores.get(c, 0.0) for c in classes], width, label=name)
            ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=60, ha="right", fontsize=8)
            what = {"fine-tuned": "fine-tuned networks", "linear probe": "linear probes on the frozen embeddings"}
            ax.set(ylabel="F1 (test)", ylim=(0, 1.05), title=f"per-class F1 on the test split: {what.get(how, how)}")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        path = folder / "per_class_f1.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends beside the axes included
        plt.close(fig)
        written.append(str(path))
    return written


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
