"""The hot per-element ops: a Triton kernel, a torch reference and one dispatching function each.

Triton runs on CUDA tensors, the torch reference on CPU tensors; CELLSSL_KERNELS=torch|triton forces one.
Never imports engine or loaders.
"""
from .csr_to_dense import csr_to_dense
from .mask_spec import MaskSpec
from .masked_linear import masked_linear
from .masking import apply_mask, gene_program_mask, isolated_mask, mask_spec, no_mask, random_mask
from .nb_augment import nb_augment
from .recon_loss import masked_recon_loss
from .sparse_rows import SparseRows, dense, difference

__all__ = ["MaskSpec", "SparseRows", "apply_mask", "dense", "difference", "csr_to_dense", "gene_program_mask", "isolated_mask", "mask_spec",
           "masked_linear", "masked_recon_loss", "nb_augment", "no_mask", "random_mask"]
