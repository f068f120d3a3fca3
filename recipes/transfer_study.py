"""Recipe: the paper's question as a study (engine/transfer.py): SSL pretraining on an auxiliary atlas, fine-tuning on
shares of a labelled target, against the supervised baseline, over seeds.
`python recipes/transfer_study.py [--aux STORE --target STORE] [--label-shares 0.01,0.05,0.2,1] [--seeds 0,1,2,3,4]
[--out DIR]`; `--help` lists every setting. Writes records.json (every run) and summary.md (scores per share,
paired differences with t intervals) in --out; the synthetic atlas is the default data."""
import sys
from pathlib import Path

from cellssl.engine.options import OneLineParser, add_options, apply
from cellssl.engine.study_stats import summary
from cellssl.engine.transfer import StudyConfig, run_study
from cellssl.loaders import InputError

if __name__ == "__main__":
    parser = OneLineParser(prog="transfer_study.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    paths = add_options(parser, StudyConfig())
    try:
        cfg = apply(StudyConfig(), parser.parse_args(), paths)
        records = run_study(cfg)
    except InputError as exc:  # the user's data or settings: one line, no traceback
        sys.exit(f"cellssl: error: {exc}")
    stores = f"auxiliary store: {cfg.aux or Path(cfg.out) / 'auxiliary.cellstore'}; target: " + (
        cfg.target or f"a synthetic draw per seed ({Path(cfg.out)}/target-seed*.cellstore)")
    table = f"{stores}\n\n" + summary(records, cfg.margin)
    (Path(cfg.out) / "summary.md").write_text(table)
    print(table)
