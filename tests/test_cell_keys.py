"""Every random draw is keyed by the cell (its global store row), never by the row's place in a batch: a batch cut
in two, each half with its cells' rows, draws exactly what the whole batch draws. This is what makes 2 ranks × B
train like 1 rank × 2B. Each op, each backend (torch reference, CPU path, Triton interpreted)."""
from __future__ import annotations

import torch
from conftest import block_programmes

from cellssl import kernels
from cellssl.kernels.nb_augment import nb_noise

N, G = 8, 40


def _batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, G, generator=gen) * (torch.rand(N, G, generator=gen) < 0.4)
    cells = torch.tensor([901, 3, 77, 12_000_000, 5, 6, 400, 22_000_001])
    return x, cells


def _halves(fn):
    x, cells = _batch()
    whole = fn(x, cells)
    parts = torch.cat([fn(x[:3], cells[:3]), fn(x[3:], cells[3:])])
    return whole, parts


def test_masks_are_keyed_by_cell(backend):
    programmes = block_programmes(G, 8, 5)
    tfs = torch.arange(8, dtype=torch.int32) * 5 + 1
    cases = {
        "random": lambda x, c: kernels.mask_spec(x, "random", 0.5, 3, 7, cells=c).keep(),
        "dropout stream": lambda x, c: kernels.mask_spec(x, "random", 0.1, 3, 7, cells=c, stream=5).keep(),
        "programmes per cell": lambda x, c: kernels.mask_spec(x, "gene_program", 0.5, 3, 7, programmes, per="cell",
                                                              cells=c).keep(),
        "programmes per step": lambda x, c: kernels.mask_spec(x, "gene_program", 0.5, 3, 7, programmes,
                                                              cells=c).keep(),
        "isolated per cell": lambda x, c: kernels.mask_spec(x, "isolated", 0.0, 3, 7, programmes, tfs, per="cell",
                                                            cells=c).selected(),
    }
    for name, fn in cases.items():
        whole, parts = _halves(fn)
        assert torch.equal(whole, parts), name
    x, cells = _batch()
    other = kernels.mask_spec(x, "random", 0.5, 3, 7, cells=cells + 1).keep()
    assert not torch.equal(other, kernels.mask_spec(x, "random", 0.5, 3, 7, cells=cells).keep())


def test_mask_applied_and_its_loss_are_keyed_by_cell(backend):
    def masked(x, c):
        return kernels.apply_mask(x, kernels.mask_spec(x, "random", 0.5, 1, 2, cells=c))

    whole, parts = _halves(masked)
    torch.testing.assert_close(whole, parts)

    def loss_grad(x, c):
        pred = torch.zeros_like(x, requires_grad=True)
        loss = kernels.masked_recon_loss(pred, x, kernels.mask_spec(x, "random", 0.5, 1, 2, cells=c))
        loss.backward()
        return pred.grad * x.numel()  # undo the per-batch normalisation

    whole, parts = _halves(loss_grad)
    torch.testing.assert_close(whole, parts)


def test_nb_noise_is_keyed_by_cell(backend):
    whole, parts = _halves(lambda x, c: nb_noise(x, 4, 9, c))
    assert torch.equal(whole, parts)
    whole, parts = _halves(lambda x, c: kernels.nb_augment(x, 0.1, 4, 9, 10_000.0, c))
    torch.testing.assert_close(whole, parts)


def test_cells_are_checked():
    x, cells = _batch()
    for bad in (cells[:3], cells.float()):
        try:
            kernels.mask_spec(x, "random", 0.5, cells=bad)
        except ValueError as exc:
            assert "store rows" in str(exc)
        else:
            raise AssertionError("accepted")
