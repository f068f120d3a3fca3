"""`cellssl synth`: write the synthetic atlas (loaders/synthetic.py) as a cell store, an .h5ad or an scTab-layout
folder (loaders/writers.py). Kept apart from the atlas so that the writers, which read the atlas, and this entry
point, which calls them, import one way. Never imports engine or kernels.
"""
from __future__ import annotations

import os
from pathlib import Path

from .genes import GeneSpace
from .synthetic import SyntheticAtlas, SyntheticConfig, SyntheticSource


def _check_replaceable(dst: Path, fmt: str, overwrite: bool) -> None:
    """--overwrite replaces only what `synth` itself writes in that format: an HDF5 file, or an scTab-layout folder."""
    from .errors import InputError

    if not dst.exists():
        return
    if not overwrite:
        raise InputError(dst, "already exists", "pass --overwrite to replace it, or choose another path")
    ours = (dst.is_file() and dst.open("rb").read(8) == b"\x89HDF\r\n\x1a\n") if fmt == "h5ad" else (
        dst.is_dir() and (dst / "var.parquet").is_file() and (dst / "categorical_lookup").is_dir())
    if not ours:
        raise InputError(dst, f"exists and is not {'an h5ad file' if fmt == 'h5ad' else 'an scTab-layout folder'}; "
                         "refusing to replace it", "choose another path, or move it away yourself")


def synth(dst: str | Path, n_cells: int, fmt: str = "cellstore", seed: int = 0, genes: str | Path = "default",
          overwrite: bool = False, progress: bool = True, datasets: tuple[int, ...] | None = None, draw: int = 0,
          **split_options) -> Path:
    """Write a synthetic atlas of `n_cells` as a cell store, an .h5ad or an scTab-layout directory. `datasets` and
    `draw` carve stores with a shift out of one atlas (e.g. an auxiliary store from datasets 0–9 and a target from
    10–11); `split_options` (val_frac, test_frac) go to the conversion."""
    from .convert import convert, destination_lock, resolve_genes

    dst = Path(dst)
    if not dst.parent.is_dir():
        from .errors import InputError

        raise InputError(dst, "its parent folder does not exist", "create it first")
    space = resolve_genes(genes, GeneSpace.default())
    config = SyntheticConfig(seed=seed, datasets=tuple(datasets) if datasets is not None else None, draw=draw)
    with destination_lock(dst):  # one writer: the conversion, and the truth written into the store after it
        if fmt == "cellstore":
            source = SyntheticSource(n_cells, config, space)
            convert(source, dst, overwrite=overwrite, seed=seed, progress=progress, lock=False, **split_options)
            source.atlas.write_truth(dst / "synthetic_truth")
            return dst
        if fmt not in ("h5ad", "sctab-parquet"):
            raise ValueError(f"unknown format {fmt!r}: choose cellstore, h5ad or sctab-parquet")
        _check_replaceable(dst, fmt, overwrite)
        _write_peer_format(SyntheticAtlas(config, space), n_cells, dst, fmt, progress, split_options)
    return dst


def _write_peer_format(atlas: SyntheticAtlas, n_cells: int, dst: Path, fmt: str, progress: bool,
                       split_options: dict) -> None:
    """An .h5ad or scTab-layout folder written under a temporary name, then renamed into place."""
    from .store import remove_tree
    from .writers import write_h5ad, write_sctab

    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        (write_h5ad if fmt == "h5ad" else write_sctab)(atlas, n_cells, tmp, progress=progress, **split_options)
        if fmt == "sctab-parquet":
            atlas.write_truth(tmp / "synthetic_truth")
        if dst.exists():
            (remove_tree(dst) if dst.is_dir() else dst.unlink())
        os.rename(tmp, dst)
    finally:
        if tmp.is_dir():
            remove_tree(tmp)
        elif tmp.exists():
            tmp.unlink()
