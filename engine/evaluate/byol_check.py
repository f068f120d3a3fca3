"""Why does BYOL collapse in the transfer study? Pretrains BYOL on a finished study's auxiliary store at the given
learning rates and target networks (EMA, the paper's intent, or frozen, as the reference's code runs), otherwise with
the study's settings, and scores it on each seed's target as the study does (its collapse signs, linear probe, kNN,
the paper's kNN, fine-tuning on the whole train split). Appends one JSON record per run to OUT/records.jsonl;
docs/results.md reports the run.

`python -m cellssl.engine.evaluate.byol_check STUDY_DIR --seeds 0,1,2 --lrs 0.001 --targets ema,frozen --out
runs/byol_check` (or recipes/byol_lr_check.py from a checkout), after `cellssl study --out STUDY_DIR …`, whose
records.json names the sizes."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from cellssl.loaders import InputError

from ..experiments import experiment
from .transfer import StudyConfig, aux_store, finetune, frozen_scores, pretrain, steps_per_epoch, target_store


def _study(root: Path) -> StudyConfig:
    path = root / "records.json"
    if not path.is_file():
        raise InputError(path, "no study records", "run `cellssl study --out DIR` first and pass that DIR")
    study = json.loads(path.read_text())["config"]
    return StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in study.items()})


def check(root: Path, seeds: list[int], lrs: list[float], targets: list[str], out: Path) -> list[dict]:
    cfg = _study(root)
    aux = aux_store(cfg, root)
    decay_steps = 2 * steps_per_epoch(aux, cfg.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for target_kind in targets:
        for lr in lrs:
            for seed in seeds:
                target, run = target_store(cfg, root, seed), out / f"byol_{target_kind}_lr{lr:g}_seed{seed}"
                base = experiment("byol")
                model = pretrain(cfg, aux, "byol", seed, run / "pretrain", decay_steps, lr=lr,
                                 objective=replace(base.objective, byol_target=target_kind))
                scores = frozen_scores(cfg, model, target)
                scores.pop("probe_f1_by_share")
                record = {"target": target_kind, "lr": lr, "seed": seed, **scores,
                          **finetune(cfg, target, target, model, seed, run / "finetune", decay_steps)}
                print(json.dumps(record), flush=True)
                with open(out / "records.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                records.append(record)
    return records


COLUMNS = (("effective_rank", "effective rank (of 64)", 1), ("embedding_norm", "mean norm", 0),
           ("probe_macro_f1", "linear probe F1", 3), ("knn_macro_f1", "kNN F1 (train)", 3),
           ("frozen_paper_knn_f1", "paper kNN F1 (frozen)", 3), ("macro_f1", "fine-tuned macro F1", 3))


def table(records: list[dict]) -> str:
    """Markdown: per target network and learning rate, each score's mean [lowest, highest seed]."""
    import pandas as pd

    from .study_stats import over_seeds

    frame = pd.DataFrame(records)
    lines = ["| target network | lr | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for (target, lr), group in frame.groupby(["target", "lr"], sort=False):
        lines.append(f"| {target} | {lr:g} | {len(group)} | " + " | ".join(
            over_seeds(group[c], digits) for c, _, digits in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = "python -m cellssl.engine.evaluate.byol_check") -> None:
    from ..options import OneLineParser

    parser = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("study", type=Path, help="a finished study's --out folder (its records.json and stores)")
    parser.add_argument("--seeds", default="0,1,2", help="study seeds to run (default 0,1,2)")
    parser.add_argument("--lrs", default="0.01,0.001", help="learning rates (default 0.01,0.001)")
    parser.add_argument("--targets", default="ema,frozen", help="target networks: ema, frozen (default both)")
    parser.add_argument("--out", type=Path, default=Path("runs/byol_check"), help="output folder (records.jsonl)")
    try:
        a = parser.parse_args(argv)
        targets = a.targets.split(",")
        if set(targets) - {"ema", "frozen"}:
            raise InputError("--targets", f"unknown target network(s) in {a.targets!r}", "choose ema, frozen or both")
        try:
            seeds, lrs = [int(s) for s in a.seeds.split(",")], [float(v) for v in a.lrs.split(",")]
        except ValueError:
            raise InputError("--seeds/--lrs", f"not a comma-separated list of numbers: {a.seeds!r} / {a.lrs!r}",
                             "write e.g. --seeds 0,1,2 --lrs 0.01,0.001") from None
        check(a.study, seeds, lrs, targets, a.out)
    except InputError as exc:
        print(f"cellssl: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
