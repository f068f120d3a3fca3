"""On-device densification: both backends equal scipy's dense matrix (and its log1p of counts per 10k)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellssl.kernels import csr_to_dense


def batch(n=16, g=2049, seed=0):
    m = sp.random(n, g, density=0.2, format="csr", random_state=seed, dtype=np.float64)
    m.data = np.ceil(m.data * 30)
    m = sp.vstack([m[:3], sp.csr_matrix((2, g)), m[3:]]).tocsr()  # empty rows in the middle
    return m


@pytest.mark.parametrize("index_dtype,value_dtype", [(np.uint16, np.uint16), (np.int32, np.float32),
                                                     (np.int64, np.uint32)])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_scipy(backend, index_dtype, value_dtype, normalize):
    m = batch()
    out = csr_to_dense(torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(index_dtype)),
                       torch.from_numpy(m.data.astype(value_dtype)), m.shape[1], 1e4 if normalize else None)
    dense = m.toarray().astype(np.float32)
    if normalize:
        sums = np.maximum(dense.sum(1, keepdims=True), 1)
        dense = np.log1p(dense / sums * np.float32(1e4))
    np.testing.assert_allclose(out.numpy(), dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_rows_of_a_larger_csr(backend, normalize):
    """csr_rows_to_dense: the rows a resident shard's batch names, in that order, repeats and empty rows included."""
    from cellssl.kernels import csr_rows_to_dense

    m = batch(n=40)
    rows = torch.tensor([39, 3, 4, 0, 17, 3, 25], dtype=torch.int64)
    out = csr_rows_to_dense(torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.uint16)),
                            torch.from_numpy(m.data.astype(np.uint16)), rows, m.shape[1], 1e4 if normalize else None)
    dense = m.toarray().astype(np.float32)[rows.numpy()]
    if normalize:
        dense = np.log1p(dense / np.maximum(dense.sum(1, keepdims=True), 1) * np.float32(1e4))
    np.testing.assert_allclose(out.numpy(), dense, rtol=1e-6, atol=1e-6)


def test_no_rows(backend):
    out = csr_to_dense(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0), 10)
    assert out.shape == (0, 10)


def test_bad_arguments():
    ip, ix, d = torch.tensor([0, 2]), torch.tensor([1, 3], dtype=torch.int32), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="differ in length"):
        csr_to_dense(ip, ix, d[:1], 5)
    with pytest.raises(TypeError, match="indices"):
        csr_to_dense(ip, ix.double(), d, 5)
    with pytest.raises(ValueError, match="n_genes"):
        csr_to_dense(ip, ix, d, 0)
