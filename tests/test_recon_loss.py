"""Fused masked reconstruction loss: value and gradient equal the unfused formula on the same selection."""
from __future__ import annotations

import pytest
import torch
from conftest import block_programmes

from cellssl.kernels import gene_program_mask, isolated_mask, masked_recon_loss, random_mask
from cellssl.kernels.recon_loss import recon_loss_reference


def naive(pred, x, selected):
    """The paper's formulation: squared error on the selected positions, summed, over all elements."""
    return ((pred - x) ** 2 * selected).sum() / x.numel()


def specs(x):
    progs = block_programmes(x.shape[1], 8, 40)
    return {"random": random_mask(x, 0.5, 3, 1)[1], "programme": gene_program_mask(x, progs, 0.5, 3, 1, "cell")[1],
            "gp_to_gp": isolated_mask(x, progs, 3, 1)[1],
            "gp_to_tf": isolated_mask(x, progs, 3, 1, tf_genes=torch.arange(8, dtype=torch.int32) * 40 + 1)[1]}


@pytest.mark.parametrize("shape", [(16, 2048), (5, 333)])
def test_loss_and_gradient_match_unfused(backend, shape):
    x = torch.rand(shape)
    for name, spec in specs(x).items():
        pred = torch.rand(shape, requires_grad=True)
        loss = masked_recon_loss(pred, x, spec)
        loss.backward()
        ref_pred = pred.detach().clone().requires_grad_()
        ref = naive(ref_pred, x, spec.selected().float())
        ref.backward()
        torch.testing.assert_close(loss, ref, msg=name)
        torch.testing.assert_close(pred.grad, ref_pred.grad, msg=name)


def test_normalised_by_all_elements(backend):
    x = torch.zeros(8, 512)
    _, spec = random_mask(x, 0.25, seed=1)
    fraction = spec.selected().float().mean()
    torch.testing.assert_close(masked_recon_loss(x + 1, x, spec), fraction)


def test_gp_to_tf_reads_only_the_tf(backend):
    x = torch.rand(4, 320)
    spec = specs(x)["gp_to_tf"]
    pred = x.clone()
    pred[~spec.selected()] += 5.0
    assert masked_recon_loss(pred, x, spec).item() == 0.0


def test_reference_gradient_is_d_loss_d_pred():
    x = torch.rand(3, 40, dtype=torch.float64)
    spec = random_mask(torch.rand(3, 40), 0.5)[1]
    sel = spec.selected()
    pred = torch.rand(3, 40, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda p: naive(p, x, sel.double()), (pred,))
    _, grad = recon_loss_reference(pred.detach(), x, spec, sel)
    expected, = torch.autograd.grad(naive(pred, x, sel.double()), pred)
    torch.testing.assert_close(grad, expected)


def test_gradient_scales_with_upstream(backend):
    x = torch.rand(4, 256)
    _, spec = random_mask(x, 0.5)
    pred = torch.rand(4, 256, requires_grad=True)
    (3.0 * masked_recon_loss(pred, x, spec)).backward()
    _, grad = recon_loss_reference(pred.detach(), x, spec, spec.selected())
    torch.testing.assert_close(pred.grad, 3.0 * grad)


def test_bad_arguments():
    x = torch.rand(4, 64)
    _, spec = random_mask(x)
    with pytest.raises(ValueError, match="shapes differ"):
        masked_recon_loss(torch.rand(4, 64), torch.rand(4, 63), spec)
    with pytest.raises(ValueError, match="mask spec"):
        masked_recon_loss(torch.rand(5, 64), torch.rand(5, 64), spec)
    with pytest.raises(TypeError, match="float32"):
        masked_recon_loss(torch.rand(4, 64).half(), x, spec)
