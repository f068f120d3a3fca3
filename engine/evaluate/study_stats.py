"""The study's statistics and its summary: per labelled share, each method's scores over seeds as they are, and
its difference from the supervised baseline paired by seed — the mean with a t interval (a bootstrap interval
beside it, never instead), and a verdict that calls a difference negligible only against an equivalence margin
stated before the runs (two one-sided tests: the 90 % t interval inside ±margin). The paired tests of one summary are
one family: their p-values are Holm-adjusted together, and each call says whether it survives the correction."""
from __future__ import annotations

import numpy as np
import pandas as pd

SETTINGS = {"a": "supervised on the labelled share", "b": "SSL on auxiliary → fine-tune",
            "c": "SSL on the target → fine-tune"}
# (score, title, the supervised baseline's score it is set against)
SCORES = (("paper_knn_f1", "paper kNN F1 (fine-tuned embedding)", "paper_knn_f1"),
          ("macro_f1", "macro F1 (classifier)", "macro_f1"),
          ("share_probe_macro_f1", "macro F1 of a linear probe on the frozen embedding, fitted on the labelled share",
           "macro_f1"))


def paired(a, b, margin: float, resamples: int = 10_000, seed: int = 0) -> dict:
    """b − a over seeds paired by seed: mean, 95 % t interval, 95 % bootstrap interval (seeds resampled), the 90 %
    t interval used for equivalence, how many seeds favour b, and the verdict."""
    from scipy import stats

    d = np.asarray(b, float) - np.asarray(a, float)
    n = len(d)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    t95, t90 = (float(stats.t.ppf(q, n - 1)) if n > 1 else float("inf") for q in (0.975, 0.95))
    means = d[np.random.default_rng(seed).integers(0, n, (resamples, n))].mean(1)
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1)) if n > 1 and se > 0 else (0.0 if mean else 1.0)
    r = {"mean": mean, "p": p, "t_low": mean - t95 * se, "t_high": mean + t95 * se, "boot_low": float(np.quantile(means, .025)),
         "boot_high": float(np.quantile(means, .975)), "eq_low": mean - t90 * se, "eq_high": mean + t90 * se,
         "wins": int((d > 0).sum()), "n": n, "margin": margin}
    r["verdict"] = verdict(r)
    return r


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over all of them), in the order given."""
    order = np.argsort(p, kind="stable")
    adjusted, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def verdict(r: dict) -> str:
    if r["t_low"] > 0:
        return "better"
    if r["t_high"] < 0:
        return "worse"
    if -r["margin"] < r["eq_low"] and r["eq_high"] < r["margin"]:
        return f"negligible (within ±{r['margin']:g})"
    return "inconclusive"


def over_seeds(values: pd.Series, digits: int = 3) -> str:
    """'mean [lowest, highest]' over seeds, or – where there is no value."""
    v = values.dropna()
    return "–" if v.empty else f"{v.mean():,.{digits}f} [{v.min():,.{digits}f}, {v.max():,.{digits}f}]"


def score_table(frame: pd.DataFrame, score: str, title: str) -> list[str]:
    shares = sorted(frame.share.unique())
    lines = [f"**{title}** — mean over seeds [lowest, highest seed]:", "",
             "| setting | method | " + " | ".join(f"{s:.0%} labelled" for s in shares) + " |",
             "|---|---|" + "---:|" * len(shares)]
    for (setting, method), group in frame.groupby(["setting", "method"], sort=False):
        cells = [over_seeds(group[group.share == s][score]) if score in group else "–" for s in shares]
        lines.append(f"| ({setting}) {SETTINGS[setting]} | {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def paired_rows(frame: pd.DataFrame, score: str, margin: float, base_score: str) -> list[tuple[float, str, dict]]:
    """(share, "(setting) method", paired result) of every method against the supervised baseline at every share."""
    rows = []
    for share in sorted(frame.share.unique()):
        at = frame[frame.share == share]
        base = at[at.setting == "a"].set_index("seed")[base_score]
        for (setting, method), group in at[at.setting != "a"].groupby(["setting", "method"], sort=False):
            other = group.set_index("seed")[score]
            seeds = sorted(set(base.dropna().index) & set(other.dropna().index))
            if len(seeds) >= 2:
                rows.append((share, f"({setting}) {method}", paired(base[seeds].to_numpy(), other[seeds].to_numpy(),
                                                                   margin)))
    return rows


def paired_table(rows: list[tuple[float, str, dict]], title: str, base_score: str) -> list[str]:
    lines = [f"**{title}** minus the supervised baseline's {base_score}, paired by seed (95 % t interval; bootstrap "
             "beside; p Holm-adjusted over every paired test of this summary):", "",
             "| share | setting, method | seeds | mean difference | 95 % t interval | 95 % bootstrap | seeds better | "
             "verdict | Holm p | after Holm |", "|---:|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for share, name, r in rows:
        called = r["verdict"] in ("better", "worse")
        kept = ("holds" if r["holm_p"] < 0.05 else "not significant") if called else "–"
        lines.append(f"| {share:.0%} | {name} | {r['n']} | {r['mean']:+.3f} | [{r['t_low']:+.3f}, {r['t_high']:+.3f}] "
                     f"| [{r['boot_low']:+.3f}, {r['boot_high']:+.3f}] | {r['wins']}/{r['n']} | {r['verdict']} | "
                     f"{r['holm_p']:.3f} | {kept} |")
    return lines + [""]


def summary(records: list[dict], margin: float) -> str:
    """Markdown: per score, the table over shares, then the paired differences against the supervised baseline."""
    frame = pd.DataFrame(records)
    family = {score: paired_rows(frame, score, margin, base) for score, _, base in SCORES if score in frame}
    tests = [r for rows in family.values() for _, _, r in rows]
    for r, adjusted in zip(tests, holm([r["p"] for r in tests])):
        r["holm_p"] = adjusted
    lines: list[str] = []
    for score, title, base in SCORES:
        if score in frame:
            lines += score_table(frame, score, title) + paired_table(family[score], title, base)
    frozen = frame[frame.setting != "a"].drop_duplicates(["seed", "setting", "method"])
    if "frozen_paper_knn_f1" in frozen:
        lines += ["**Frozen embeddings**, once per seed (paper kNN: the validation split's labels; kNN (train) and the "
                  "linear probe: every label of the train split, whatever the share), mean over seeds [range]:", "",
                  "| setting | method | paper kNN F1 | kNN F1 (train) | linear probe F1 | masked fraction | effective "
                  "rank | mean norm |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for (setting, method), group in frozen.groupby(["setting", "method"], sort=False):
            lines.append(f"| ({setting}) {SETTINGS[setting]} | {method} | " + " | ".join(
                over_seeds(group[c]) if c in group else "–" for c in ("frozen_paper_knn_f1", "knn_macro_f1",
                                                                   "probe_macro_f1", "masked_fraction")) + " | "
                + " | ".join(over_seeds(group[c], 1) if c in group else "–" for c in ("effective_rank", "embedding_norm"))
                + " |")
    return "\n".join(lines) + "\n"
