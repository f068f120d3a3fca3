"""results.json → a markdown table (one row per model or baseline, one column per headline number) and PNG
plots: a UMAP of each embedding coloured by cell type and by batch, and per-class F1 bars."""
from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = [  # (header, task, path into that task's entry)
    ("macro F1 linear probe", "cell_type", ("linear_probe", "macro_f1")),
    ("macro F1 kNN", "cell_type", ("knn", "macro_f1")),
    ("macro F1 fine-tuned", "cell_type", ("finetune", "macro_f1")),
    ("micro F1 fine-tuned", "cell_type", ("finetune", "micro_f1")),
    ("expl. var. (weighted)", "reconstruction", ("all", "variance_weighted")),
    ("expl. var. masked", "reconstruction", ("masked", "variance_weighted")),
    ("Pearson/feature frozen", "cross_modality", ("frozen", "pearson_per_feature")),
    ("Pearson/feature fine-tuned", "cross_modality", ("finetuned", "pearson_per_feature")),
    ("Pearson/cell fine-tuned", "cross_modality", ("finetuned", "pearson_per_cell")),
    ("scIB batch", "integration", ("batch_correction",)),
    ("scIB bio", "integration", ("bio_conservation",)),
    ("scIB total", "integration", ("total",)),
]


def lookup(results: dict, task: str, name: str, path: tuple[str, ...]):
    value = results.get(task, {}).get(name)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def markdown(results: dict) -> str:
    names = list(results["representations"])
    columns = [c for c in COLUMNS if any(lookup(results, c[1], n, c[2]) is not None for n in names)]
    lines = [f"Evaluation of `{results['store']}` (label `{results['label']}`; fitted on train, scored on test)", "",
             "| representation | " + " | ".join(c[0] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in names:
        cells = [lookup(results, task, name, path) for _, task, path in columns]
        kind = results["representations"][name]["kind"]
        label = f"{name} *(baseline)*" if kind == "baseline" else name
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in cells) + " |")
    for task, why in results.get("skipped", {}).items():
        lines.append(f"\n{task} skipped: {why}")
    lines += per_class_table(results)
    return "\n".join(lines) + "\n"


def per_class_scores(results: dict) -> tuple[str, dict[str, dict[str, float]]]:
    """F1 per class of each representation: fine-tuned where it was, else the linear probe."""
    chosen = {}
    for name, r in results.get("cell_type", {}).items():
        chosen[name] = (r.get("finetune") or r["linear_probe"])["per_class_f1"]
    fine = all("finetune" in r for r in results.get("cell_type", {}).values())
    return ("fine-tuned" if fine else "fine-tuned where available, else linear probe"), chosen


def per_class_table(results: dict) -> list[str]:
    if not results.get("cell_type"):
        return []
    how, scores = per_class_scores(results)
    names = list(scores)
    support = next(iter(results["cell_type"].values()))["linear_probe"]["support"]
    classes = sorted({c for s in scores.values() for c in s}, key=lambda c: -support.get(c, 0))
    lines = ["", f"Per-class F1 on the test split ({how}), classes by test support:", "",
             "| cell type | test cells | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for c in classes:
        lines.append(f"| {c} | {support.get(c, 0)} | " + " | ".join(
            "–" if c not in scores[n] else f"{scores[n][c]:.3f}" for n in names) + " |")
    return lines


TOP_CATEGORIES = 12  # distinct colours with a legend; the rest are grey "other"


def _scatter(ax, xy: np.ndarray, codes: np.ndarray, names: list[str], size: float) -> None:
    """Cells coloured by their TOP_CATEGORIES most frequent categories (tab20, named in a legend beside the axes);
    rarer ones and unlabelled cells grey, drawn first so that they stay in the background."""
    import matplotlib.pyplot as plt

    present, counts = np.unique(codes[codes >= 0], return_counts=True)
    top = present[np.argsort(-counts, kind="stable")][:TOP_CATEGORIES]
    rest = ~np.isin(codes, top)
    if rest.any():
        label = f"other ({len(present) - len(top)} more)" if len(present) > len(top) else "unlabelled"
        ax.scatter(*xy[rest].T, color="lightgrey", s=size, linewidths=0, rasterized=True, label=label)
    colours = plt.get_cmap("tab20").colors
    for i, code in enumerate(top):
        chosen = codes == code
        ax.scatter(*xy[chosen].T, color=colours[(2 * i) % 20 if i < 10 else (2 * i - 19) % 20], s=size,
                   linewidths=0, rasterized=True, label=f"{names[code]} ({chosen.sum():,})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=max(1.0, 12 / size),
              frameon=False)


def plots(results: dict, embeddings: dict[str, np.ndarray], labels: np.ndarray, label_names: list[str],
          batch: np.ndarray | None, folder: Path, seed: int = 0, max_cells: int = 10_000,
          batch_names: list[str] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

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
        xy = umap.UMAP(random_state=seed, n_jobs=1).fit_transform(z[keep])
        fig, axes = plt.subplots(1, len(colourings), figsize=(8.5 * len(colourings), 5.5), squeeze=False)
        for ax, (title, codes, names) in zip(axes[0], colourings):
            _scatter(ax, xy, codes, names, size)
            ax.set(title=f"{name}: coloured by {title}", xticks=[], yticks=[])
        path = folder / f"umap_{_slug(name)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    how, per_class = per_class_scores(results)
    if per_class:
        classes = sorted({c for scores in per_class.values() for c in scores}, key=label_names.index)
        fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(classes) * len(per_class) ** 0.5), 5.5))
        width = 0.8 / len(per_class)
        for i, (name, scores) in enumerate(per_class.items()):
            ax.bar(np.arange(len(classes)) + i * width, [scores.get(c, 0.0) for c in classes], width, label=name)
        ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=60, ha="right", fontsize=8)
        ax.set(ylabel="F1 (test)", ylim=(0, 1.05), title=f"per-class F1 ({how})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        path = folder / "per_class_f1.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
