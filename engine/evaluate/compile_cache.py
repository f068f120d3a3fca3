"""Compiled code the evaluation's libraries would otherwise compile again in every process, kept under
$CELLSSL_CACHE (default ~/.cache/cellssl, beside the default store): jax's programs (scib-metrics) and numba's
functions (umap's neighbour graph and layout, which scib-metrics uses too). A small evaluation spent most of its
minute compiling them (bench/README.md); a later one loads them. A cache that cannot be written is skipped: the
libraries then compile as before."""
from __future__ import annotations

import importlib
from pathlib import Path

from cellssl.loaders.synthetic import cache_dir


def _folder(name: str) -> Path | None:
    """$CELLSSL_CACHE/`name`, made if need be; None where it cannot be."""
    root = cache_dir() / name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root


def jax_programs() -> None:
    """jax keeps every compiled program in $CELLSSL_CACHE/jax."""
    import jax

    root = _folder("jax")
    if root is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(root))
    # every program, however quick to compile: the metrics compile hundreds of small ones (one per label's cell
    # count), each under 0.2 s, and together most of a small evaluation's integration
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# umap compiles these without numba's cache (parallel functions, ~6 s a process on 2 cores); its other functions
# keep their own cache (cache=True, beside umap's source) and are left where they are
UMAP_MODULES = ("umap.umap_", "umap.layouts", "umap.spectral", "umap.utils")


def numba_functions(modules: tuple[str, ...] = UMAP_MODULES) -> int:
    """Turn on numba's on-disk cache, in $CELLSSL_CACHE/numba, for the uncached jitted functions of `modules`
    (numba's own `Dispatcher.enable_caching`; numba checks the source file's stamp, so an upgraded library
    recompiles). Returns how many were turned on; idempotent."""
    from numba import config
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    root = _folder("numba")
    if root is None:
        return 0
    before, config.CACHE_DIR = config.CACHE_DIR, str(root)  # read when each cache is made, not after
    turned = 0
    try:
        for name in modules:
            module = importlib.import_module(name)
            for value in vars(module).values():
                if isinstance(value, CPUDispatcher) and isinstance(value._cache, NullCache) \
                        and getattr(value.py_func, "__module__", None) == name:
                    try:
                        value.enable_caching()
                    except RuntimeError:  # no place numba can write: compile as before
                        continue
                    turned += 1
    finally:
        config.CACHE_DIR = before
    return turned
