"""What every recipe shares: its command line (`--data`, `--max-steps`, `--out`, `--resume`, …) over a default
config, then `train`. Works under `deepspeed recipes/X.py` (which adds --local_rank) and `python recipes/X.py`."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .config import TrainConfig


def parse(defaults: TrainConfig, argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=f"pretrain/fine-tune ({defaults.objective.name}, {defaults.objective.mask})")
    p.add_argument("--data", default=defaults.data, help="cell store (default: the embedded synthetic store)")
    p.add_argument("--out", default=defaults.out)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="cells per rank per step")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=defaults.precision,
                   help="bf16: matmuls in bfloat16 autocast (4x the CPU matmul rate where AVX512-BF16/AMX exist)")
    p.add_argument("--programmes", default=defaults.objective.programmes, help="GMT file of gene programmes")
    p.add_argument("--per", choices=["batch", "cell"], default=defaults.objective.per)
    p.add_argument("--label", default=defaults.objective.label, help="obs column for supervised objectives")
    p.add_argument("--init-encoder", default=defaults.init_encoder, help="model.pt to start the encoder from")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--val-every", type=int, default=defaults.val_every)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--deepspeed-config", default=defaults.deepspeed_config)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--trace", action="store_true", help="per-rank trace of cells and weights (trace-rankN.jsonl)")
    args, _ = p.parse_known_args(argv)  # the deepspeed launcher appends --local_rank
    objective = replace(defaults.objective, programmes=args.programmes, per=args.per, label=args.label)
    return replace(defaults, data=args.data, out=args.out, max_steps=args.max_steps, batch_size=args.batch_size,
                   lr=args.lr, seed=args.seed, precision=args.precision, objective=objective, init_encoder=args.init_encoder,
                   log_every=args.log_every, val_every=args.val_every, checkpoint_every=args.checkpoint_every,
                   deepspeed_config=args.deepspeed_config, resume=args.resume, trace=args.trace)


def run(defaults: TrainConfig) -> None:
    from cellssl.loaders import InputError

    from .trainer import NonFiniteLoss, train

    try:
        path = train(parse(defaults, sys.argv[1:]))
    except (InputError, NonFiniteLoss) as exc:  # the user's data or settings: one line, no traceback
        print(f"cellssl: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"model: {path}")
