"""The `cellssl` command line: convert, synth, info, train, embed, eval, plot, upgrade-model.

Argument parsing and printing only; the work lives in loaders and the engine. A bad input (a typo, an abbreviated
option, a value out of range) ends in one line on stderr and exit status 2, never a traceback; so does a closed
pipe (`cellssl info X | head`), quietly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from cellssl.loaders import CellStore, InputError
from cellssl.loaders.convert import convert, open_source
from cellssl.loaders.store import Layout
from cellssl.loaders.synth import synth
from cellssl.loaders.synthetic import default_store

from .evaluate.config import EvalConfig


def _command(sub, name: str, help: str, **kw):
    """A subcommand (a OneLineParser, like its parent) that refuses abbreviated options."""
    return sub.add_parser(name, help=help, allow_abbrev=False, **kw)


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def _workers(text: str) -> int:
    from cellssl.loaders.workers import cores

    return cores() if text == "auto" else _at_least(1)(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def _add_convert(sub) -> None:
    p = _command(sub, "convert", "convert h5ad, scTab parquet or a 10x folder into a cell store")
    p.add_argument("format", choices=["h5ad", "sctab", "10x"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--genes", default=None,
                   help="target gene space: 'default' (19,350 reference genes), 'keep' (the source's own), a cell "
                        "store or a gene-list file (default: 'keep' for sctab, 'default' otherwise)")
    p.add_argument("--split-by", help="obs column holding train/val/test (h5ad)")
    p.add_argument("--val-frac", type=_fraction, default=None,
                   help="share of cells drawn for validation (default 0.1, when the source has no split of its own)")
    p.add_argument("--test-frac", type=_fraction, default=None, help="share drawn for testing (default 0.1)")
    p.add_argument("--layer", default="auto", help="h5ad matrix: auto, X, counts, raw or a layer name")
    p.add_argument("--value-kind", choices=["auto", "counts", "log1p_10k"], default="auto")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed of the split assignment and the in-split shuffle")
    p.add_argument("--codec", default=Layout.codec, help="auto (default: blosc-lz4 for integers, zstd1 for floats), blosc-lz4, zstdN or none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at DST")
    p.add_argument("--workers", type=_workers, default="auto",
                   help="processes for the passes that can be split (scTab part files): a number, or auto (the "
                        "cores there are; the default); the store is the same for any number")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_synth(sub) -> None:
    p = _command(sub, "synth", "write a synthetic atlas (cell store, h5ad or scTab-layout parquet)")
    p.add_argument("dst")
    p.add_argument("--cells", type=_at_least(1), required=True)
    p.add_argument("--format", choices=["cellstore", "h5ad", "sctab-parquet"], default="cellstore")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--genes", default="default", help="gene space: 'default', a cell store or a gene-list file")
    p.add_argument("--datasets", default=None,
                   help="draw cells from these of the 12 datasets only, e.g. 10,11 (a target with a batch shift)")
    p.add_argument("--draw", type=_at_least(0), default=0, help="an independent draw of cells from the same atlas")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _add_info(sub) -> None:
    p = _command(sub, "info", "describe a cell store ('default': the embedded synthetic store)")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_embed(sub) -> None:
    p = _command(sub, "embed", "write embeddings of every cell of a store, an .h5ad or a 10x folder, in the source's "
                 "cell order and under its cell names (parquet, or obsm of an .h5ad), with the model that made them")
    p.add_argument("model", help="a model written by a recipe (model.safetensors), or its run folder")
    p.add_argument("store", help="a cell store ('default': the embedded synthetic store), an .h5ad or a 10x folder "
                   "(genes matched to the model's)")
    p.add_argument("out", help="OUT.parquet (cell_id, obs columns, z0…) or OUT.h5ad (obsm['X_cellssl'])")
    p.add_argument("--batch-size", type=_at_least(1), default=8192)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _add_plot(sub) -> None:
    p = _command(sub, "plot", "training curves of runs side by side (loss, validation, lr, cells/s) as a PNG")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="curves.png", help="the PNG to write")


def _add_upgrade(sub) -> None:
    p = _command(sub, "upgrade-model", "convert a model.pt of cellssl < 0.2 to model.safetensors (read with "
                       "torch's restricted unpickler: no code in the file runs)")
    p.add_argument("model", help="the old model.pt")
    p.add_argument("out", nargs="?", help="where to write (default: model.safetensors beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def _add_eval(sub) -> None:
    from .options import add_options

    p = _command(sub, "eval", "evaluate models and baselines on a labelled store (results.json/.md, plots)")
    p.add_argument("models", nargs="*", help="models (model.safetensors or run folders), optionally named: NAME=PATH "
                   "(default name: the run folder)")
    p.set_defaults(eval_paths=add_options(p, EvalConfig(), skip=("models",)))


def eval_config(args) -> EvalConfig:
    from .options import apply

    models = {}
    for item in args.models:
        name, _, path = item.rpartition("=")
        name = name or (Path(path).name if Path(path).is_dir() else Path(path).parent.name) or Path(path).stem
        if name in models:
            raise InputError(item, f"two models are named {name!r}", "name them: NAME=PATH")
        models[name] = path
    cfg = apply(EvalConfig(models=models), args, args.eval_paths)
    return replace(cfg, data=str(default_store() if cfg.data == "default" else cfg.data))


def info(store: CellStore) -> dict:
    obs = store.obs()
    columns = {}
    for name in obs.columns:
        col = obs[name]
        columns[name] = (f"categorical, {len(col.cat.categories)} categories" if hasattr(col, "cat")
                         else f"{col.dtype}")
    return {"path": str(store.path), "cells": store.n_cells, "genes": store.n_genes, "nnz": store.nnz,
            "nnz_per_cell": round(store.nnz / max(store.n_cells, 1), 1), "value_kind": store.value_kind,
            "splits": store.splits, "obs_columns": columns, "size_on_disk_mb": round(store.size_on_disk() / 1e6, 1),
            "source": store.attrs.get("source"), "shuffle_seed": store.attrs.get("shuffle_seed")}


def run_convert(args) -> None:
    options = {"layer": args.layer} if args.format == "h5ad" else {}
    source = open_source(args.format, args.src, **options)
    genes = args.genes or ("keep" if args.format == "sctab" else "default")
    convert(source, args.dst, genes=genes, split_by=args.split_by, val_frac=args.val_frac, test_frac=args.test_frac,
            seed=args.seed, overwrite=args.overwrite, value_kind=None if args.value_kind == "auto" else args.value_kind,
            layout=Layout(codec=args.codec), progress=not args.quiet, workers=args.workers)


def run_synth(args) -> None:
    datasets = tuple(int(d) for d in args.datasets.split(",")) if args.datasets else None
    synth(args.dst, args.cells, args.format, args.seed, args.genes, args.overwrite, progress=not args.quiet,
          datasets=datasets, draw=args.draw)
    print(f"wrote {args.dst}", file=sys.stderr)


def run_plot(args) -> None:
    from .plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}", file=sys.stderr)


def run_upgrade(args) -> None:
    from .checkpoint import upgrade_model

    print(f"wrote {upgrade_model(args.model, args.out, args.overwrite)}", file=sys.stderr)


def run_embed(args) -> None:
    from .embed import check_output, embed_data, provenance, write_embeddings

    check_output(args.out, args.overwrite)
    made_by = provenance(args.model)
    embeddings, obs = embed_data(args.model, default_store() if args.store == "default" else args.store,
                                 args.batch_size)
    write_embeddings(embeddings, obs, args.out, made_by)
    print(f"wrote {args.out}: {embeddings.shape[0]:,} cells x {embeddings.shape[1]} dimensions", file=sys.stderr)


def run_eval(args) -> None:
    from .evaluate.suite import evaluate

    cfg = eval_config(args)
    evaluate(cfg)
    print(Path(cfg.out, "results.md").read_text())
    print(f"wrote {cfg.out}/results.json, results.md and plots/", file=sys.stderr)


def run_info(args) -> None:
    report = info(CellStore(default_store() if args.store == "default" else args.store))
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


def _add_train(sub) -> None:
    _command(sub, "train", "train an experiment of the registry in one process: cellssl train EXPERIMENT [options] "
             "(cellssl train EXPERIMENT --help lists them; several GPUs: deepspeed --module cellssl.train …)")


def _add_study(sub) -> None:
    _command(sub, "study", "the paper's transfer study: SSL pretraining on an auxiliary atlas, fine-tuning on shares "
             "of a labelled target, against the supervised baseline, over seeds (cellssl study --help lists its "
             "options; docs/results.md)")


COMMANDS = {"convert": (_add_convert, run_convert), "synth": (_add_synth, run_synth), "info": (_add_info, run_info),
            "train": (_add_train, None), "study": (_add_study, None), "embed": (_add_embed, run_embed),
            "eval": (_add_eval, run_eval),
            "plot": (_add_plot, run_plot), "upgrade-model": (_add_upgrade, run_upgrade)}


def main(argv: list[str] | None = None) -> int:
    from .options import OneLineParser

    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineParser(prog="cellssl", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    try:
        if argv[:1] == ["train"]:  # its options depend on the experiment: the recipe's parser reads them
            from .recipe import run_experiment

            run_experiment(argv[1:])
            return 0
        if argv[:1] == ["study"]:  # its options are the study config's: its own parser reads them
            from .evaluate.transfer import main as study

            study(argv[1:], prog="cellssl study")
            return 0
        args = parser.parse_args(argv)
        COMMANDS[args.command][1](args)
    except InputError as exc:
        print(f"cellssl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM during a conversion: its temporary files are already gone
        print("cellssl: interrupted; nothing partial was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
