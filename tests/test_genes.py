"""Gene spaces, alignment and gene programmes."""
from __future__ import annotations

import numpy as np
import pytest

from cellssl.loaders import GeneSpace, InputError, align_genes
from cellssl.loaders.genes import strip_version
from cellssl.loaders.genesets import index_programmes, read_gmt


def test_default_space_is_the_reference_list():
    space = GeneSpace.default()
    assert len(space) == 19350 and space.gene_id[0] == "ENSG00000000003" and space.gene_name[0] == "TSPAN6"
    assert len(set(space.gene_id)) == len(space)


def test_strip_version():
    assert strip_version("ENSG00000141510.17") == "ENSG00000141510"
    assert strip_version("TP53.1") == "TP53.1"


def test_alignment_mapping_and_report():
    target = GeneSpace.from_lists(["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"], ["A", "B", "C"])
    source = GeneSpace.from_lists(["ENSG00000000003.2", "ENSG00000000009", "ENSG00000000001"], ["C", "Z", "A"])
    al = align_genes(source, target, "src")
    np.testing.assert_array_equal(al.source_to_target, [2, -1, 0])
    assert al.n_matched == 2 and not al.is_identity
    assert "2 of 3 target genes matched by Ensembl id" in al.report()
    assert "1 target genes missing" in al.report() and "1 of 3 source genes not in the target" in al.report()


def test_alignment_by_symbol_case_insensitive():
    target = GeneSpace.from_lists(["ENSG00000000001", "ENSG00000000002"], ["CD3E", "MS4A1"])
    source = GeneSpace.from_lists(["ms4a1", "cd3e"])
    al = align_genes(source, target, "src")
    assert al.matched_by == "symbol"
    np.testing.assert_array_equal(al.source_to_target, [1, 0])


def test_symbols_colliding_on_one_target_gene():
    target = GeneSpace.from_lists(["ENSG00000000001"], ["CD3E"])
    with pytest.raises(InputError, match="duplicated gene symbols"):
        align_genes(GeneSpace.from_lists(["CD3E", "cd3e"]), target, "src")


def test_gmt_reading_and_bitsets(tmp_path):
    space = GeneSpace.from_lists([f"ENSG{i:011d}" for i in range(70)], [f"G{i}" for i in range(70)])
    (tmp_path / "p.gmt").write_text("P1\tdesc\tG1\tG2\tENSG00000000069\n"
                                    "P2\tdesc\tNOPE\tG33\n"
                                    "EMPTY\tdesc\tNOPE\n")
    sets = read_gmt(tmp_path / "p.gmt")
    index = index_programmes(sets, space)
    assert index.names == ["P1", "P2"]  # a programme with no gene in the space is dropped
    assert index.n_listed == 6 and index.n_mapped == 4
    bits = index.bits.view(np.uint32)
    dense = index.dense()
    unpacked = (bits[:, np.arange(70) // 32] >> (np.arange(70) % 32).astype(np.uint32)) & 1
    np.testing.assert_array_equal(unpacked.astype(bool), dense)
    assert dense[0, [1, 2, 69]].all() and dense[1, 33] and dense.sum() == 4


def test_gmt_errors(tmp_path):
    (tmp_path / "bad.gmt").write_text("only\tone field\n")
    with pytest.raises(InputError, match="bad.gmt:1: fewer than 3"):
        read_gmt(tmp_path / "bad.gmt")
    (tmp_path / "mouse.gmt").write_text("P\td\tENSMUSG00000000001\tNotAGene7\n")
    with pytest.raises(InputError, match="none of the 2 programme genes"):
        index_programmes(read_gmt(tmp_path / "mouse.gmt"), GeneSpace.default())


def test_packaged_go_programmes():
    index = index_programmes(read_gmt(), GeneSpace.default(), min_genes=15, max_genes=500)
    assert len(index.names) == 5146 and index.n_mapped == index.n_listed
