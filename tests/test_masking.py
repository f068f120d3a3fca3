"""Masking ops: Triton kernel = torch reference on the same mask; statistics; edge cases; errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import block_programmes

from cellssl.kernels import apply_mask, gene_program_mask, isolated_mask, mask_spec, random_mask
from cellssl.kernels.masking import mask_reference, pack_bits, unpack_bits

SHAPES = [(16, 2048), (7, 2049), (3, 100)]


def random_programmes(n_genes, n_programmes=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flags = torch.rand(n_programmes, n_genes, generator=gen) < 0.1
    flags[3] = False  # a programme with no gene in the space
    return pack_bits(flags)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_mask_kind_matches_reference(backend, shape):
    x = torch.rand(shape)
    progs = random_programmes(shape[1])
    tfs = torch.arange(len(progs), dtype=torch.int32) * 3
    cases = {"random": random_mask(x, 0.5, seed=1, step=2),
             "programme/batch": gene_program_mask(x, progs, 0.5, 1, 2, "batch"),
             "programme/cell": gene_program_mask(x, progs, 0.5, 1, 2, "cell"),
             "gp_to_gp": isolated_mask(x, progs, 1, 2),
             "gp_to_tf": isolated_mask(x, progs, 1, 2, tf_genes=tfs)}
    for name, (out, spec) in cases.items():
        assert spec.triton == (backend == "triton"), name
        keep = spec.keep()
        torch.testing.assert_close(out, mask_reference(x, spec, keep), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(out[keep], (x * spec.scale[:, None])[keep], msg=name)
        assert (out[~keep] == 0).all(), name


def test_bit_modes_agree_across_backends(monkeypatch):
    """Programme masks are deterministic: the Triton kernel and the torch reference give identical outputs."""
    x = torch.rand(9, 1000)
    progs = random_programmes(1000)
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CELLSSL_KERNELS", backend)
        outs[backend] = [gene_program_mask(x, progs, 0.4, 3, 4, "cell")[0], isolated_mask(x, progs, 3, 4)[0]]
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rate", [0.15, 0.5, 0.9])
def test_random_rate_and_upscale(backend, rate):
    x = torch.rand(32, 4096) + 0.1
    out, spec = random_mask(x, rate, seed=5, step=0)
    masked = (out == 0).float().mean().item()
    n = out.numel()
    assert abs(masked - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / (1 - rate))


def test_same_seed_same_mask_other_step_other_mask(backend):
    x = torch.rand(16, 2048)
    a, _ = random_mask(x, 0.5, seed=9, step=3)
    b, _ = random_mask(x, 0.5, seed=9, step=3)
    c, _ = random_mask(x, 0.5, seed=9, step=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.4 < ((a == 0) == (c == 0)).float().mean() < 0.6  # independent, not shifted copies


def test_rate_zero_and_invalid(backend):
    x = torch.rand(4, 300)
    out, spec = random_mask(x, 0.0)
    assert torch.equal(out, x) and not spec.selected().any()
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
            random_mask(x, bad)


def test_programme_choice_per_batch(backend):
    x = torch.rand(16, 2049)
    progs = block_programmes(2049, 20, 50)
    out, spec = gene_program_mask(x, progs, 0.3, seed=2, step=7, per="batch")
    masked_genes = (~spec.keep()).all(0)
    assert masked_genes.sum() == 6 * 50  # ⌊0.3 · 20⌋ programmes, in every cell
    assert ((~spec.keep()) == masked_genes).all()
    torch.testing.assert_close(spec.scale, torch.full((16,), 2049 / (2049 - 300)))


def test_programme_choice_per_cell_is_uniform(backend):
    x = torch.rand(64, 1000)
    progs = block_programmes(1000, 10, 100)
    out, spec = gene_program_mask(x, progs, 0.5, seed=2, step=7, per="cell")
    masked = (~spec.keep()).view(64, 10, 100)
    per_programme = masked.all(2)
    assert (per_programme.sum(1) == 5).all()  # each cell: exactly ⌊0.5 · 10⌋ programmes
    assert (masked.any(2) == per_programme).all()  # whole programmes only
    counts = per_programme.sum(0).float()  # each programme chosen in ~half the cells
    assert ((counts - 32).abs() < 4 * 4).all()
    assert len({tuple(r.tolist()) for r in per_programme}) > 20  # fresh choice per cell
    torch.testing.assert_close(spec.scale, torch.full((64,), 1000 / 500))


def test_empty_programme_list(backend):
    x = torch.rand(5, 70)
    empty = torch.zeros(0, 3, dtype=torch.int32)
    out, spec = gene_program_mask(x, empty, 0.5)
    assert torch.equal(out, x)
    with pytest.raises(ValueError, match="no programme has a gene"):
        isolated_mask(x, empty)
    with pytest.raises(ValueError, match="no programme has a gene"):
        isolated_mask(x, torch.zeros(4, 3, dtype=torch.int32))


def test_isolated_gp_to_gp_and_gp_to_tf(backend):
    x = torch.rand(16, 2048)
    progs = block_programmes(2048, 8, 64)
    progs[5] = 0  # empty programme: never chosen
    out, spec = isolated_mask(x, progs, seed=1, step=1, per="cell")
    keep = spec.keep()
    assert (keep.sum(1) == 64).all() and torch.equal(spec.selected(), ~keep)  # GP→GP: predict the masked rest
    chosen = keep.view(16, 32, 64).all(2).float().argmax(1)
    assert 5 not in chosen.tolist()
    torch.testing.assert_close(spec.scale, torch.full((16,), 2048 / 64))
    tf_genes = torch.arange(8, dtype=torch.int32) * 64 + 3  # each TF inside its own target block
    out, spec = isolated_mask(x, progs, seed=1, step=1, tf_genes=tf_genes)
    keep, sel = spec.keep(), spec.selected()
    assert (sel.sum(1) == 1).all() and not (keep & sel).any()  # the answer is never in the input
    assert (keep.sum(1) == 63).all()


@pytest.mark.parametrize("kind", ["random", "gene_program", "gene_program_genes", "gp_to_gp", "gp_to_tf"])
def test_no_pretext_task_asks_for_a_value_its_input_shows(kind):
    """The loss never reads a position the masked input keeps unchanged: for every mask kind, selected ∧ keep = ∅."""
    x = torch.rand(16, 2048)
    progs = block_programmes(2048, 16, 100)
    tf_genes = torch.arange(16, dtype=torch.int32) * 100 + 7 if kind == "gp_to_tf" else None
    if kind == "random":
        spec = mask_spec(x, "random", 0.5, 0, 1)
    elif kind.startswith("gene_program"):
        spec = mask_spec(x, "gene_program", 0.5, 0, 1, progs, per="cell",
                         rate_of="genes" if kind.endswith("genes") else "programmes")
    else:
        spec = mask_spec(x, "isolated", 0.0, 0, 1, progs, tf_genes, "cell")
    keep, selected = spec.keep(), spec.selected()
    assert selected.any(1).all() and not (keep & selected).any()


@pytest.mark.parametrize("per", ["batch", "cell"])
def test_programme_rate_as_a_fraction_of_genes(per):
    """rate_of="genes": programmes are drawn until the rate's share of the genes is masked, whatever the programme
    sizes; rate_of="programmes" (the paper) masks ⌊rate · P⌋ programmes, however many genes that hides."""
    g = 4000
    flags = torch.zeros(40, g, dtype=torch.bool)
    for p in range(40):  # overlapping programmes of 400 genes: half of them cover 76 % of the genes
        flags[p, torch.randperm(g, generator=torch.Generator().manual_seed(p))[:400]] = True
    progs = pack_bits(flags)
    x = torch.rand(64, g)
    genes = mask_spec(x, "gene_program", 0.3, 0, 1, progs, per=per, rate_of="genes")
    assert 0.3 <= genes.masked_fraction() < 0.4
    paper = mask_spec(x, "gene_program", 0.5, 0, 1, progs, per=per, rate_of="programmes")
    assert paper.masked_fraction() > 0.7
    assert paper.masked_fraction() == pytest.approx(1 - paper.keep().float().mean().item())


def test_gradients_flow_through_the_mask(backend):
    x = torch.rand(6, 300, requires_grad=True)
    out, spec = random_mask(x, 0.5, seed=4)
    (out * torch.arange(300.0)).sum().backward()
    expected = mask_reference(torch.arange(300.0).expand(6, 300).contiguous(), spec, spec.keep())
    torch.testing.assert_close(x.grad, expected)
    x64 = torch.rand(3, 20, dtype=torch.float64, requires_grad=True)
    small = random_mask(torch.rand(3, 20), 0.5)[1]
    torch.autograd.gradcheck(lambda t: mask_reference(t, small, small.keep()), (x64,))


def test_bits_round_trip():
    flags = torch.rand(5, 70) < 0.5
    torch.testing.assert_close(unpack_bits(pack_bits(flags), 70), flags)


def test_bad_arguments():
    x = torch.rand(4, 64)
    with pytest.raises(ValueError, match="2-D"):
        random_mask(torch.rand(64))
    with pytest.raises(TypeError, match="float32"):
        random_mask(x.double())
    with pytest.raises(ValueError, match="words per row"):
        gene_program_mask(x, torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        gene_program_mask(x, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="per must be"):
        gene_program_mask(x, torch.zeros(3, 2, dtype=torch.int32), per="row")
    _, spec = random_mask(x)
    with pytest.raises(ValueError, match="shape"):
        apply_mask(torch.rand(5, 64), spec)
    with pytest.raises(ValueError, match="tf_genes"):
        isolated_mask(x, block_programmes(64, 2, 8), tf_genes=torch.tensor([1], dtype=torch.int32))
