"""The CSR path gives what the dense path gives: the same loss and the same gradients for every objective, the
ops that accept `SparseRows` agree with their dense references, and the loader's CSR ring equals its dense batches."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_objectives import CASES, config

from cellssl import kernels
from cellssl.engine.setup import build_objective
from cellssl.kernels import SparseRows
from cellssl.kernels.masking import pack_bits
from cellssl.loaders import TARGET_SUM, BatchStream, BlockShuffleSampler, CellStore


def sparse_rows(batch, n_genes) -> SparseRows:
    return SparseRows(batch.indptr, batch.indices, batch.data, n_genes)


def csr_of(x: torch.Tensor, index_dtype=torch.int32) -> SparseRows:
    m = sp.csr_matrix(x.numpy())
    return SparseRows(torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices).to(index_dtype),
                      torch.from_numpy(m.data.astype(np.float32)), x.shape[1])


def expression(n=24, g=70, density=0.1, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, g, generator=gen) * 3
    return torch.where(torch.rand(n, g, generator=gen) < density, x, 0.0)


def loss_and_grads(objective, x, labels, step):
    objective.zero_grad()
    loss, _ = objective(x, labels, step)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,mask", CASES)
def test_every_objective_same_loss_and_gradients(synthetic_store, name, mask, monkeypatch):
    if name not in ("byol", "barlow_twins"):  # only NB-noised views may densify the batch
        monkeypatch.setattr(SparseRows, "to_dense", lambda self: pytest.fail("the CSR batch was densified"))
    store = CellStore(synthetic_store)
    programmes = str(synthetic_store / "synthetic_truth" / ("tf_targets.gmt" if mask == "gp_to_tf" else
                                                            "programmes.gmt")) if mask != "random" else None
    torch.manual_seed(0)
    objective = build_objective(config(name, mask, programmes, per="cell"), store)
    dense = BatchStream(store, "train", batch_size=64, seed=3)
    csr = BatchStream(store, "train", batch_size=64, seed=3, output="csr")
    # steps 0..3: BYOL's and Barlow Twins' views take each combination of noise and dropout across them
    for step, (a, b) in enumerate(zip(dense, csr)):
        if step == 4:
            break
        labels = a.obs.get("cell_type")
        want, want_grads = loss_and_grads(objective, a.x, labels, step)
        got, got_grads = loss_and_grads(objective, sparse_rows(b, store.n_genes), labels, step)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (name, mask, step)
        assert got_grads.keys() == want_grads.keys()
        for key in want_grads:
            torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-6, msg=key)
        objective.after_step()


@pytest.mark.parametrize("kind", ["random", "gene_program", "isolated", "gp_to_tf", "none"])
def test_first_layer_and_loss_from_csr(kind):
    x = expression()
    rows = csr_of(x, torch.uint16)
    programmes = pack_bits(torch.rand(5, x.shape[1], generator=torch.Generator().manual_seed(1)) < 0.3)
    if kind == "none":
        spec = kernels.no_mask(x)
    elif kind == "gp_to_tf":
        spec = kernels.mask_spec(x, "isolated", 0.0, 1, 2, programmes, torch.arange(5, dtype=torch.int32), "cell")
    else:
        spec = kernels.mask_spec(x, kind, 0.5, 1, 2, programmes, per="cell")
    assert kernels.mask_spec(rows, "random", 0.5, 1, 2).shape == spec.shape
    weight = torch.randn(8, x.shape[1], requires_grad=True)
    out_dense = kernels.masked_linear(x, spec, weight)
    out_dense.square().sum().backward()
    grad_dense, weight.grad = weight.grad, None
    out_csr = kernels.masked_linear(rows, spec, weight)
    out_csr.square().sum().backward()
    torch.testing.assert_close(out_csr, out_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, grad_dense, rtol=1e-5, atol=1e-5)

    pred = torch.randn(x.shape, requires_grad=True)
    loss_dense = kernels.masked_recon_loss(pred, x, spec)
    (g_dense,) = torch.autograd.grad(loss_dense, pred)
    loss_csr = kernels.masked_recon_loss(pred, rows, spec)
    (g_csr,) = torch.autograd.grad(loss_csr, pred)
    torch.testing.assert_close(loss_csr, loss_dense, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_csr, g_dense, rtol=1e-6, atol=1e-7)


def test_dense_fallbacks_agree():
    """A batch too full for the sparse product, and raw counts (densified with their normalisation), take the dense
    path and still agree."""
    x = expression(density=0.6)
    spec = kernels.mask_spec(x, "random", 0.5, 0, 0)
    weight = torch.randn(4, x.shape[1])
    torch.testing.assert_close(kernels.masked_linear(csr_of(x), spec, weight), kernels.masked_linear(x, spec, weight))
    counts = torch.floor(expression(density=0.1) * 3)
    raw = csr_of(counts)
    raw = SparseRows(raw.indptr, raw.indices, raw.data, raw.n_genes, target_sum=TARGET_SUM)
    normalised = torch.log1p(counts / counts.sum(1, keepdim=True).clamp(min=1) * 1e4)
    torch.testing.assert_close(raw.to_dense(), normalised)
    pred = torch.randn(counts.shape)
    torch.testing.assert_close(kernels.difference(pred, raw), pred - normalised)
    torch.testing.assert_close(kernels.masked_recon_loss(pred, raw, spec), kernels.masked_recon_loss(pred, normalised,
                                                                                                      spec))


def test_sparse_rows_refuses_malformed_parts():
    x = csr_of(expression())
    with pytest.raises(TypeError, match="indptr must be"):
        SparseRows(x.indptr.int(), x.indices, x.data, x.n_genes)
    with pytest.raises(TypeError, match="data float32"):
        SparseRows(x.indptr, x.indices, x.data.double(), x.n_genes)
    with pytest.raises(ValueError, match="one length"):
        SparseRows(x.indptr, x.indices[:-1], x.data, x.n_genes)


def test_csr_ring_reuses_its_blocks_and_matches_dense(synthetic_store):
    store = CellStore(synthetic_store)
    dense = BatchStream(store, "train", batch_size=32, seed=1)
    csr = BatchStream(store, "train", batch_size=32, seed=1, output="csr")
    seen, allocated = set(), []
    for a, b in zip(dense.endless(), csr.endless()):
        assert b.indices.dtype == torch.from_numpy(np.zeros(0, store.index_dtype)).dtype
        got = csr_of(a.x)
        torch.testing.assert_close(sparse_rows(b, store.n_genes).to_dense(), a.x)
        assert len(b.data) == got.nnz
        if a.epoch == 0:
            allocated.append(b.data.untyped_storage().data_ptr())
        else:  # after the first epoch nothing is allocated: every batch lives in one of the ring's blocks
            seen.add(b.data.untyped_storage().data_ptr())
        if a.epoch == 2:
            break
    blocks = [(block.data_ptr(), block.data_ptr() + len(block)) for block in csr._ring.blocks]
    assert all(any(lo <= p < hi for lo, hi in blocks) for p in seen) and len(blocks) == len(csr._ring)
    assert len(set(allocated)) <= len(csr._ring)  # the headroom covers 32-cell batches from the first
    raw = next(iter(BatchStream(store, "train", batch_size=32, seed=1, output="csr", normalize=False)))
    first = next(iter(BatchStream(store, "train", batch_size=32, seed=1)))
    counted = SparseRows(raw.indptr, raw.indices, raw.data, store.n_genes,
                         target_sum=TARGET_SUM if store.value_kind == "counts" else None)
    torch.testing.assert_close(counted.to_dense(), first.x)


def test_feed_hands_the_model_csr_or_dense(synthetic_store):
    """engine/feed.py on CPU: --input csr gives SparseRows of host-normalised values, --input dense the loader's dense
    batch; both describe the same cells."""
    from cellssl.engine.feed import Feed

    store = CellStore(synthetic_store)
    got = {}
    for kind in ("csr", "dense"):
        feed = Feed(kind, torch.device("cpu"), store, label="cell_type")
        fed = next(feed(feed.stream(store, "train", BlockShuffleSampler(*store.split("train"), 32))))
        assert torch.equal(fed.labels, fed.source.obs["cell_type"])
        got[kind] = fed.x
    assert isinstance(got["csr"], SparseRows) and not got["csr"].counts
    torch.testing.assert_close(got["csr"].to_dense(), got["dense"])
    with pytest.raises(ValueError, match="input must be one of"):
        Feed("coo", torch.device("cpu"), store)
