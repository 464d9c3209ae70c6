"""Swiss-Prot flat-file parser on hand-written entries (current and pre-2019 feature-table formats)."""

from __future__ import annotations

import numpy as np
import pytest

from saelab.corpora.swissprot import crop, label_names, parse_swissprot

ENTRIES = """\
ID   TEST1_HUMAN             Reviewed;          40 AA.
AC   P99991; Q00001;
DT   01-JAN-2020, integrated into UniProtKB/Swiss-Prot.
DE   RecName: Full=Test protein one;
OS   Homo sapiens (Human).
OC   Eukaryota; Metazoa.
OX   NCBI_TaxID=9606;
FT   SIGNAL          1..5
FT   TRANSMEM        10..20
FT                   /note="Helical"
FT   ZN_FING         22..30
FT                   /note="C2H2-type"
FT   DISULFID        23..28
FT   BINDING         35
FT                   /ligand="Zn(2+)"
FT   HELIX           ?..8
FT   STRAND          36..38
FT   VARIANT         12
FT                   /note="L -> P"
SQ   SEQUENCE   40 AA;  4500 MW;  0000000000000000 CRC64;
     MKTAYIAKQR QISFVKSHFS CQPECGKSHA EKLKNLTEEW
//
ID   TEST2_YEAST             Reviewed;          25 AA.
AC   P99992;
DT   01-JAN-2005, integrated into UniProtKB/Swiss-Prot.
DE   RecName: Full=Test protein two;
OS   Saccharomyces cerevisiae.
OC   Eukaryota; Fungi.
OX   NCBI_TaxID=4932;
FT   TRANSMEM      3     12       Helical; (Potential).
FT   TOPO_DOM     13     25       Cytoplasmic.
FT   DISULFID      2      2       Interchain.
SQ   SEQUENCE   25 AA;  2800 MW;  0000000000000000 CRC64;
     MCLLVALIAG LLFRKDESTQ NDEKR
//
"""


@pytest.fixture
def flatfile(tmp_path):
    path = tmp_path / "entries.dat"
    path.write_text(ENTRIES)
    return path


def _mask(n: int, *ranges) -> np.ndarray:
    """1-based inclusive UniProt ranges → bool mask."""
    m = np.zeros(n, dtype=bool)
    for lo, hi in ranges:
        m[lo - 1 : hi] = True
    return m


def test_current_format_entry(flatfile):
    recs = parse_swissprot([flatfile], min_subtype_residues=1)
    assert [r.accession for r in recs] == ["P99991", "P99992"]
    r = recs[0]
    assert r.sequence == "MKTAYIAKQRQISFVKSHFSCQPECGKSHAEKLKNLTEEW" and len(r) == 40
    np.testing.assert_array_equal(r.labels["signal_peptide"], _mask(40, (1, 5)))
    np.testing.assert_array_equal(r.labels["transmembrane"], _mask(40, (10, 20)))
    np.testing.assert_array_equal(r.labels["zinc_finger"], _mask(40, (22, 30)))
    # a disulfide bond labels its two cysteines only, not the span between them
    np.testing.assert_array_equal(r.labels["disulfide_bond"], _mask(40, (23, 23), (28, 28)))
    np.testing.assert_array_equal(r.labels["binding_site"], _mask(40, (35, 35)))
    np.testing.assert_array_equal(r.labels["strand"], _mask(40, (36, 38)))
    assert not r.labels["helix"].any()  # the uncertain "?..8" helix is skipped
    # sub-types from the note
    np.testing.assert_array_equal(r.labels["transmembrane:Helical"], _mask(40, (10, 20)))
    np.testing.assert_array_equal(r.labels["zinc_finger:C2H2-type"], _mask(40, (22, 30)))


def test_old_format_entry_and_alignment(flatfile):
    recs = parse_swissprot([flatfile], min_subtype_residues=1)
    r = recs[1]
    np.testing.assert_array_equal(r.labels["transmembrane"], _mask(25, (3, 12)))
    np.testing.assert_array_equal(r.labels["topological_domain"], _mask(25, (13, 25)))
    np.testing.assert_array_equal(r.labels["topological_domain:Cytoplasmic"], _mask(25, (13, 25)))
    np.testing.assert_array_equal(
        r.labels["transmembrane:Helical"], _mask(25, (3, 12))
    )  # "(Potential)" dropped
    np.testing.assert_array_equal(r.labels["disulfide_bond"], _mask(25, (2, 2)))
    # every record carries every label, sub-types found in any record included
    assert set(recs[0].labels) == set(recs[1].labels)
    assert not recs[1].labels["zinc_finger:C2H2-type"].any()
    names = label_names(recs)
    assert names[:3] == ["transmembrane", "topological_domain", "signal_peptide"]
    assert names[-1] == "zinc_finger:C2H2-type"


def test_rare_subtypes_dropped_and_bad_input(flatfile, tmp_path):
    recs = parse_swissprot([flatfile], min_subtype_residues=12)
    # Helical covers 11 + 10 residues over the two entries; C2H2-type 9; Cytoplasmic 13
    assert {k for k in recs[0].labels if ":" in k} == {
        "transmembrane:Helical",
        "topological_domain:Cytoplasmic",
    }
    with pytest.raises(ValueError, match="unknown annotation"):
        parse_swissprot([flatfile], annotations=["zinc_fingers"])
    with pytest.raises(FileNotFoundError, match="data.files"):
        parse_swissprot([tmp_path / "missing.dat"])


def test_crop_splits_long_sequences_with_labels(flatfile):
    recs = parse_swissprot([flatfile], annotations=["transmembrane", "zinc_finger"])
    windows = crop(recs, 16)
    assert [len(w) for w in windows] == [13, 13, 14, 12, 13]
    assert "".join(w.sequence for w in windows[:3]) == recs[0].sequence
    np.testing.assert_array_equal(
        np.concatenate([w.labels["zinc_finger"] for w in windows[:3]]), recs[0].labels["zinc_finger"]
    )
    assert windows[1].accession == "P99991/14-26"


def test_emboss_entries_parse():
    from saelab.assets import AssetMissing
    from saelab.corpora.swissprot import emboss_files

    try:
        files = emboss_files()
    except AssetMissing as e:
        pytest.skip(str(e))
    recs = parse_swissprot(files)
    assert len(recs) == 125
    tm = sum(int(r.labels["transmembrane"].sum()) for r in recs)
    assert tm > 2000 and any(r.labels["zinc_finger"].any() for r in recs)
