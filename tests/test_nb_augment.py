"""NB augmentation: kernel = reference on the same noise; the noise has the NB(10, U(0,1)) distribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cellssl.kernels import nb_augment
from cellssl.kernels.nb_augment import counts_from_uniform, nb_augment_reference, nb_noise


def mixture_cdf(k: np.ndarray) -> np.ndarray:
    return 1.0 - 10.0 / (k + 11.0)


@pytest.mark.parametrize("shape", [(16, 2048), (3, 777)])
def test_kernel_matches_reference_on_its_noise(backend, shape):
    x = torch.rand(shape) * 3
    out = nb_augment(x, 0.1, seed=7, step=2, target_sum=1e4)
    noise = nb_noise(x, 7, 2)
    torch.testing.assert_close(out, nb_augment_reference(x, 0.1, noise, 1e4), rtol=1e-5, atol=1e-5)
    assert torch.equal(noise, nb_noise(x, 7, 2)) and not torch.equal(noise, nb_noise(x, 7, 3))


def test_noise_distribution_matches_closed_form(backend):
    noise = nb_noise(torch.zeros(16, 2048), 11, 0).flatten().numpy()
    ks = np.arange(0, 2000)
    empirical = np.searchsorted(np.sort(noise), ks, side="right") / len(noise)
    assert np.abs(empirical - mixture_cdf(ks)).max() < 0.015  # KS bound for 32k draws at alpha ≈ 1e-3


def test_inversion_equals_torch_gamma_poisson_sampling():
    """Two-sample KS against torch.distributions.NegativeBinomial with probs ~ U(0, 1), tail included."""
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    ours = counts_from_uniform(torch.rand(n, generator=gen)).numpy()
    torch.manual_seed(0)
    theirs = torch.distributions.NegativeBinomial(10, probs=torch.rand(n)).sample().numpy()
    grid = np.unique(np.concatenate([np.arange(200), np.logspace(2.5, 7, 60).astype(int)]))
    cdf_a = np.searchsorted(np.sort(ours), grid, side="right") / n
    cdf_b = np.searchsorted(np.sort(theirs), grid, side="right") / n
    assert np.abs(cdf_a - cdf_b).max() < 1.95 * np.sqrt(2 / n) * 1.5
    assert np.abs(cdf_a - mixture_cdf(grid)).max() < 0.005
    for a, b in ((ours, theirs),):  # moments of log1p(K): the raw mean is infinite
        np.testing.assert_allclose(np.log1p(a).mean(), np.log1p(b).mean(), rtol=0.01)
        np.testing.assert_allclose(np.log1p(a).var(), np.log1p(b).var(), rtol=0.02)
    assert (ours > 1e5).mean() == pytest.approx(10 / (1e5 + 11), rel=0.25)  # large rates reached


@pytest.mark.parametrize("total", [1e4, 1e6])
def test_rows_normalised_to_the_target_sum(backend, total):
    out = nb_augment(torch.zeros(8, 1500), 0.1, seed=3, step=0, target_sum=total)
    sums = torch.expm1(out.double() / 0.1).sum(1)
    torch.testing.assert_close(sums, torch.full((8,), total, dtype=torch.float64), rtol=1e-3, atol=0)


def test_clamped_at_zero_and_intensity_zero(backend):
    x = -torch.rand(4, 300)
    assert (nb_augment(x, 0.1, 0, 0, 1e4) >= 0).all()
    y = torch.rand(4, 300)
    torch.testing.assert_close(nb_augment(y, 0.0, 0, 0, 1e4), y)


def test_csr_batch_equals_its_dense_form(backend):
    """A CSR batch gets the same noised view as its dense form: its stored values are added to the noise."""
    import scipy.sparse as sp

    from cellssl.kernels import SparseRows

    m = sp.random(12, 700, density=0.1, format="csr", random_state=0, dtype=np.float32)
    rows = SparseRows(torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int32)),
                      torch.from_numpy(m.data), 700)
    dense = torch.from_numpy(m.toarray())
    assert torch.equal(nb_augment(rows, 0.1, 4, 5, 1e4), nb_augment(dense, 0.1, 4, 5, 1e4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        nb_augment(torch.rand(10), 0.1, 0, 0, 1e4)
    with pytest.raises(TypeError, match="float32"):
        nb_augment(torch.rand(2, 10, dtype=torch.float64), 0.1, 0, 0, 1e4)
