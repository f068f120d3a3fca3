"""Every launch the dispatchers make, as (name, kernel, signature, constexprs): the argument types they really
pass and each compile-time variant. Triton's interpreter (what the tests run on CPU) accepts code its compiler
rejects, so tests compile each of these ahead of time for CUDA targets (`compile_all`), which needs no GPU, and
bench/gpu_check.py compiles them natively. Never imports engine or loaders.
"""
from __future__ import annotations

from itertools import product

# Triton's type names for the torch dtypes the dispatchers accept
_PTR = {"float32": "*fp32", "uint16": "*u16", "int16": "*i16", "int32": "*i32", "uint32": "*u32", "int64": "*i64"}
KEY = "i64"   # random keys are 63-bit (dispatch.random_key)
TARGETS = (80, 90)  # sm_80 (A100) and sm_90 (H100/H200)


def _mask_launches():
    from .masking import DROP_BITS, KEEP_BITS, RANDOM, _kept_kernel, _mask_kernel

    sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "scale_ptr": "*fp32", "row_bits_ptr": "*i32",
           "row_index_ptr": "*i32", "cells_ptr": "*i64", "n_cells": "i32", "n_genes": "i32", "n_words": "i32", "key": KEY, "rate": "fp32",
           "MODE": "constexpr", "BLOCK_R": "constexpr", "BLOCK_G": "constexpr"}
    for mode in (RANDOM, DROP_BITS, KEEP_BITS):
        yield f"mask MODE={mode}", _mask_kernel, sig, {"MODE": mode, "BLOCK_R": 4, "BLOCK_G": 1024}
    counted = {"partial_ptr": "*i32", **{k: v for k, v in sig.items() if k not in ("x_ptr", "out_ptr", "scale_ptr")}}
    yield "kept count MODE=0", _kept_kernel, counted, {"MODE": RANDOM, "BLOCK_R": 4, "BLOCK_G": 1024}


def _loss_launches():
    from .masking import DROP_BITS, KEEP_BITS, RANDOM, TARGET_GENE, TARGET_MASKED
    from .recon_loss import _loss_kernel

    sig = {"pred_ptr": "*fp32", "x_ptr": "*fp32", "grad_ptr": "*fp32", "partial_ptr": "*fp32",
           "row_bits_ptr": "*i32", "row_index_ptr": "*i32", "cells_ptr": "*i64", "target_gene_ptr": "*i32",
           "n_cells": "i32",
           "n_genes": "i32", "n_words": "i32", "key": KEY, "rate": "fp32", "inv_n": "fp32", "MODE": "constexpr",
           "TARGET": "constexpr", "BLOCK_R": "constexpr", "BLOCK_G": "constexpr"}
    # the (mode, target) pairs mask_spec produces: the masked positions (random, programme and GP→GP masks) or
    # one gene per row (GP→TF)
    for mode, target in ((RANDOM, TARGET_MASKED), (DROP_BITS, TARGET_MASKED), (KEEP_BITS, TARGET_MASKED),
                         (KEEP_BITS, TARGET_GENE)):
        yield (f"masked_recon_loss MODE={mode} TARGET={target}", _loss_kernel, sig,
               {"MODE": mode, "TARGET": target, "BLOCK_R": 4, "BLOCK_G": 1024})


def _nb_launches():
    from .nb_augment import _nb_kernel

    sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "cells_ptr": "*i64", "n_cells": "i32", "n_genes": "i32", "key": KEY,
           "intensity": "fp32", "target_sum": "fp32", "RAW": "constexpr", "BLOCK_R": "constexpr",
           "BLOCK_G": "constexpr"}
    for raw in (False, True):
        yield f"nb_augment RAW={raw}", _nb_kernel, sig, {"RAW": raw, "BLOCK_R": 1, "BLOCK_G": 1024}


def _csr_launches():
    from .csr_to_dense import _csr_kernel

    # what the loader and the store hand over: int64 offsets (int32 from callers that pack them), uint16 or
    # int32 gene indices (int64 from torch code), float32 values or uint16/uint32 integer counts; every batch
    # row (rows_ptr then stands in for indptr) or the rows a resident shard's batch names (int64 row ids)
    for indptr, indices, data, normalize, rows in product(("int32", "int64"), ("uint16", "int32", "int64"),
                                                          ("float32", "uint16", "uint32"), (False, True),
                                                          (False, True)):
        if rows and indptr != "int64":
            continue  # a resident shard's offsets are int64
        sig = {"indptr_ptr": _PTR[indptr], "indices_ptr": _PTR[indices], "data_ptr": _PTR[data],
               "rows_ptr": "*i64" if rows else _PTR[indptr], "out_ptr": "*fp32", "n_genes": "i32",
               "target_sum": "fp32", "NORMALIZE": "constexpr", "ROWS": "constexpr", "BLOCK": "constexpr"}
        yield (f"csr_to_dense {indptr}/{indices}/{data} NORMALIZE={normalize} ROWS={rows}", _csr_kernel, sig,
               {"NORMALIZE": normalize, "ROWS": rows, "BLOCK": 1024})


def launches():
    """(name, jit kernel, signature, constexprs) for every variant a dispatcher can launch."""
    for group in (_mask_launches, _loss_launches, _nb_launches, _csr_launches):
        yield from group()


def compile_all(arch: int = 90, only: str | None = None):
    """Compile every launch ahead of time for CUDA sm_`arch` (no GPU needed); yields (name, error or None).
    Run it in a process without TRITON_INTERPRET: the interpreter replaces the kernels with Python functions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    for name, kernel, signature, constexprs in launches():
        if only and only not in name:
            continue
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
            error = None if compiled.asm.get("cubin") else "no cubin produced"
        except Exception as exc:  # the compiler's own message is what a developer needs
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        yield name, error


if __name__ == "__main__":  # python -m cellssl.kernels.variants [ARCH...]: one line per launch, exit 1 on failure
    import sys

    failed = 0
    for arch in [int(a) for a in sys.argv[1:]] or TARGETS:
        for name, error in compile_all(arch):
            failed += error is not None
            print(f"sm_{arch} {name}: {'ok' if error is None else error}", flush=True)
    sys.exit(1 if failed else 0)
