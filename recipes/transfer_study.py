"""Recipe: the paper's transfer-learning study on the synthetic atlas (see engine/transfer.py).
`python recipes/transfer_study.py [--seeds 0,1,2,3,4] [--pretrain-steps 300] [--finetune-steps 150] [--out DIR]`;
writes records.json (every run) and summary.md (mean ± sd over seeds, paired differences) in --out."""
import argparse
from pathlib import Path

from cellssl.engine.transfer import METHODS, StudyConfig, run_study, summary

if __name__ == "__main__":
    d = StudyConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=d.out)
    p.add_argument("--aux-cells", type=int, default=d.aux_cells)
    p.add_argument("--target-cells", type=int, default=d.target_cells)
    p.add_argument("--n-genes", type=int, default=d.n_genes, help="reference genes kept (0: all 19,350)")
    p.add_argument("--methods", default=",".join(d.methods), help=f"SSL on auxiliary: subset of {','.join(METHODS)} (experiment names)")
    p.add_argument("--target-methods", default=",".join(d.target_methods), help="SSL on the target itself")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--finetune-batch-size", type=int, default=d.finetune_batch_size)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision)
    a = p.parse_args()
    split = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    cfg = StudyConfig(out=a.out, aux_cells=a.aux_cells, target_cells=a.target_cells, n_genes=a.n_genes,
                      methods=split(a.methods), target_methods=split(a.target_methods),
                      seeds=tuple(int(s) for s in split(a.seeds)), pretrain_steps=a.pretrain_steps,
                      finetune_steps=a.finetune_steps, batch_size=a.batch_size,
                      finetune_batch_size=a.finetune_batch_size, precision=a.precision)
    table = summary(run_study(cfg))
    (Path(a.out) / "summary.md").write_text(table)
    print(table)
