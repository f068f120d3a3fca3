"""The masked first layer and the CPU random stream: the sparse path equals the reference (values and gradients)
for every mask kind; the fused CPU loss equals the reference; the random stream has the right statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellssl import kernels
from cellssl.kernels.masking import _random_keep, mask_reference, pack_bits, threshold16
from cellssl.kernels.recon_loss import recon_loss_reference


def sparse_batch(n=23, g=301, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, g, generator=gen) * (torch.rand(n, g, generator=gen) < 0.2)
    x[4] = 0.0  # an empty cell
    return x


def specs(x):
    g = x.shape[1]
    flags = torch.rand(9, g, generator=torch.Generator().manual_seed(1)) < 0.15
    progs = pack_bits(flags)
    tfs = torch.arange(9, dtype=torch.int32) * 5
    return {"random": kernels.mask_spec(x, "random", 0.5, 3, 11),
            "random 0.25": kernels.mask_spec(x, "random", 0.25, 3, 12),
            "programme/batch": kernels.mask_spec(x, "gene_program", 0.5, 3, 11, progs),
            "programme/cell": kernels.mask_spec(x, "gene_program", 0.5, 3, 11, progs, per="cell"),
            "gp_to_gp": kernels.mask_spec(x, "isolated", 0.0, 3, 11, progs, per="cell"),
            "gp_to_tf": kernels.mask_spec(x, "isolated", 0.0, 3, 11, progs, tfs, per="cell")}


@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_first_layer_equals_reference_values_and_gradients(monkeypatch, with_bias):
    monkeypatch.setenv("CELLSSL_KERNELS", "torch")
    x = sparse_batch()
    for name, spec in specs(x).items():
        w = torch.randn(16, x.shape[1], dtype=torch.float32, requires_grad=True)
        b = torch.randn(16, requires_grad=True) if with_bias else None
        out = kernels.masked_linear(x, spec, w, b)
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, [w] + ([b] if with_bias else []), grad_out)
        ref = F.linear(mask_reference(x, spec), w, b)
        want = torch.autograd.grad(ref, [w] + ([b] if with_bias else []), grad_out)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=name)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4, msg=name)


def test_reference_path_when_forced_or_when_x_needs_a_gradient(monkeypatch):
    monkeypatch.setenv("CELLSSL_KERNELS", "torch")
    x = sparse_batch()
    spec = kernels.mask_spec(x, "random", 0.5, 0, 0)
    w = torch.randn(8, x.shape[1])
    monkeypatch.setenv("CELLSSL_SPARSE_INPUT", "0")
    dense = kernels.masked_linear(x, spec, w)
    monkeypatch.setenv("CELLSSL_SPARSE_INPUT", "1")
    torch.testing.assert_close(kernels.masked_linear(x, spec, w), dense, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    kernels.masked_linear(xg, spec, w).sum().backward()
    torch.testing.assert_close(xg.grad, mask_reference(torch.ones_like(x), spec) * w.sum(0))
    with pytest.raises(ValueError, match="weight has 7 inputs"):
        kernels.masked_linear(x, spec, torch.randn(8, 7))


def test_cpu_random_loss_equals_reference(monkeypatch):
    monkeypatch.setenv("CELLSSL_KERNELS", "torch")
    x = sparse_batch(n=31, g=517)
    pred = torch.randn_like(x, requires_grad=True)
    spec = kernels.mask_spec(x, "random", 0.5, 5, 9)
    loss = kernels.masked_recon_loss(pred, x, spec)
    (grad,) = torch.autograd.grad(loss, pred)
    want, want_grad = recon_loss_reference(pred.detach(), x, spec)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-9)


def random_keep(key, shape, rate, device="cpu") -> torch.Tensor:
    out = np.empty(shape, np.bool_)
    _random_keep(key, np.arange(shape[0], dtype=np.int64), shape[1], threshold16(rate), out)
    return torch.from_numpy(out)


def test_cpu_random_stream_statistics():
    keep = random_keep(12345, (400, 1003), 0.5, "cpu")
    assert abs(keep.float().mean().item() - 0.5) < 0.005
    rows, cols = keep.float().mean(1), keep.float().mean(0)
    assert rows.std() < 0.03 and cols.std() < 0.04                 # no row or gene favoured
    k = keep.float() - 0.5
    assert abs((k[:, :-1] * k[:, 1:]).mean().item()) < 0.01        # neighbours (same hash word) independent
    assert abs((k[:-1] * k[1:]).mean().item()) < 0.01              # neighbouring cells independent
    quarter = random_keep(12345, (400, 1003), 0.25, "cpu").float().mean().item()
    assert abs(quarter - 0.75) < 0.005
    other = random_keep(12346, (400, 1003), 0.5, "cpu")
    assert (keep == other).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(keep, random_keep(12345, (400, 1003), 0.5, "cpu"))


def test_masked_linear_on_either_backend_equals_reference(backend):
    x = sparse_batch(n=8, g=130)
    spec = kernels.mask_spec(x, "random", 0.5, 2, 3)
    w, b = torch.randn(4, 130), torch.randn(4)
    torch.testing.assert_close(kernels.masked_linear(x, spec, w, b), F.linear(mask_reference(x, spec), w, b),
                               rtol=1e-5, atol=1e-5)


def test_dense_inputs_take_the_dense_product(monkeypatch):
    import importlib

    ml = importlib.import_module("cellssl.kernels.masked_linear")  # the package's masked_linear attribute is the function

    monkeypatch.setenv("CELLSSL_KERNELS", "numba")
    calls = []
    real = ml._SparseLinear.apply
    monkeypatch.setattr(ml._SparseLinear, "apply", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(4, 301)
    dense = torch.rand(23, 301) + 0.1                       # an NB-noised view: every gene nonzero
    spec = kernels.mask_spec(dense, "random", 0.1, 0, 0)
    torch.testing.assert_close(kernels.masked_linear(dense, spec, w), F.linear(mask_reference(dense, spec), w))
    assert calls == []
    kernels.masked_linear(sparse_batch(), kernels.mask_spec(sparse_batch(), "random", 0.1, 0, 0), w)
    assert calls == [1]
