"""The hot per-element ops, one file each: a Triton kernel, a CPU path (numba) where one pays, a torch reference
and one dispatching function (kernels/dispatch.py says which runs; CELLSSL_KERNELS=torch|numba|triton forces one).
Never imports engine or loaders.
"""
from .csr_to_dense import csr_rows_to_dense, csr_to_dense
from .masked_linear import masked_linear
from .masking import MaskSpec, apply_mask, gene_program_mask, isolated_mask, mask_spec, no_mask, random_mask
from .nb_augment import nb_augment
from .recon_loss import masked_recon_loss
from .sparse_rows import SparseRows, dense, difference

__all__ = ["MaskSpec", "SparseRows", "apply_mask", "csr_rows_to_dense", "csr_to_dense", "dense", "difference",
           "gene_program_mask", "isolated_mask", "mask_spec", "masked_linear", "masked_recon_loss", "nb_augment",
           "no_mask", "random_mask"]
