"""UniProt/Swiss-Prot flat files → sequences with per-residue annotation labels.

Villegas Garcia & Ansuini (arXiv:2502.09135) test SAE latents for enrichment in UniProt feature
annotations. This module turns each entry's feature table into boolean per-residue masks, one per
annotation type, following the paper's three kinds of features:
  * regions (helix, strand, turn, transmembrane, zinc finger, signal peptide, ...): every residue
    from start to end is labelled;
  * pairs (disulfide bond): only the two bonded cysteines are labelled, not the span between them;
  * sites (binding site, active site, glycosylation): the residue(s) at the given position.
Hierarchical types also get sub-type labels "<type>:<first part of the description>" (e.g.
"transmembrane:Helical", "zinc_finger:C2H2-type") when the sub-type labels at least
`min_subtype_residues` residues. Positions that UniProt marks uncertain ("?", "<", ">") are skipped
when they cannot be resolved to an integer.

Offline data: the Swiss-Prot entries in Debian's `emboss-test` package (`emboss_files()`); any other
flat file (e.g. a full `uniprot_sprot.dat`) works the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# UniProt feature key → (annotation name, kind). Both the old ("TRANSMEM 37 60") and the current
# ("TRANSMEM 37..60 /note=...") feature-table formats use these keys.
FEATURES: dict[str, tuple[str, str]] = {
    "TRANSMEM": ("transmembrane", "region"),
    "INTRAMEM": ("intramembrane", "region"),
    "TOPO_DOM": ("topological_domain", "region"),
    "SIGNAL": ("signal_peptide", "region"),
    "TRANSIT": ("transit_peptide", "region"),
    "HELIX": ("helix", "region"),
    "STRAND": ("strand", "region"),
    "TURN": ("turn", "region"),
    "ZN_FING": ("zinc_finger", "region"),
    "DNA_BIND": ("dna_binding", "region"),
    "NP_BIND": ("nucleotide_binding", "region"),
    "REGION": ("region_of_interest", "region"),
    "MOTIF": ("motif", "region"),
    "REPEAT": ("repeat", "region"),
    "DOMAIN": ("domain", "region"),
    "COILED": ("coiled_coil", "region"),
    "DISULFID": ("disulfide_bond", "pair"),
    "BINDING": ("binding_site", "site"),
    "METAL": ("metal_binding", "site"),
    "ACT_SITE": ("active_site", "site"),
    "CARBOHYD": ("glycosylation_site", "site"),
    "MOD_RES": ("modified_residue", "site"),
    "SITE": ("site", "site"),
}
# types whose description names a sub-type worth its own label (the paper's level-1 names)
HIERARCHICAL = {"transmembrane", "zinc_finger", "topological_domain", "region_of_interest", "binding_site"}
DEFAULT_ANNOTATIONS = (
    "transmembrane",
    "topological_domain",
    "signal_peptide",
    "helix",
    "strand",
    "turn",
    "zinc_finger",
    "disulfide_bond",
    "binding_site",
    "metal_binding",
    "glycosylation_site",
)


@dataclass
class ProteinRecord:
    """One entry: accession, sequence and {annotation name: bool mask over residues}."""

    accession: str
    sequence: str
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequence)


def _int_pos(pos) -> int | None:
    try:
        return int(pos)
    except (TypeError, ValueError):
        return None


def _subtype(description: str) -> str | None:
    """Level-1 sub-type: the description up to the first ';' or '.', without evidence remarks."""
    head = re.split(r"[;.]", description or "", maxsplit=1)[0]
    head = re.sub(r"\s*\((By similarity|Potential|Probable)\)\s*", "", head).strip()
    return head or None


def _feature_residues(kind: str, start: int, end: int, length: int) -> list[int]:
    """0-based residue indices a feature labels (Biopython locations are 0-based, end-exclusive)."""
    if kind == "pair":
        idx = [start, end - 1]
    elif kind == "site":
        idx = list(range(start, max(end, start + 1)))
    else:
        idx = list(range(start, end))
    return [i for i in idx if 0 <= i < length]


def parse_swissprot(
    paths: Iterable[str | Path],
    annotations: Sequence[str] = DEFAULT_ANNOTATIONS,
    min_subtype_residues: int = 100,
    min_length: int = 1,
) -> list[ProteinRecord]:
    """Parse Swiss-Prot flat files into `ProteinRecord`s with per-residue labels.

    Every record gets a mask for every requested annotation (all False when it has none), so the
    masks line up across records. Sub-type labels ("transmembrane:Helical") are added for the
    hierarchical types when, over all records, they cover at least `min_subtype_residues` residues.
    """
    from Bio import SwissProt

    unknown = set(annotations) - {name for name, _ in FEATURES.values()}
    if unknown:
        raise ValueError(
            f"unknown annotation types {sorted(unknown)}; known: {sorted(n for n, _ in FEATURES.values())}."
        )
    wanted = set(annotations)
    records: list[ProteinRecord] = []
    subtype_residues: dict[str, int] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Swiss-Prot file {path} does not exist; point data.files at flat files.")
        with open(path) as handle:
            for entry in SwissProt.parse(handle):
                seq = entry.sequence.upper()
                if len(seq) < min_length:
                    continue
                labels = {a: np.zeros(len(seq), dtype=bool) for a in annotations}
                for feat in entry.features:
                    if feat.type not in FEATURES:
                        continue
                    name, kind = FEATURES[feat.type]
                    if name not in wanted:
                        continue
                    start = _int_pos(feat.location.start) if feat.location is not None else None
                    end = _int_pos(feat.location.end) if feat.location is not None else None
                    if start is None or end is None:
                        continue
                    idx = _feature_residues(kind, start, end, len(seq))
                    labels[name][idx] = True
                    if name in HIERARCHICAL:
                        desc = feat.qualifiers.get("description") or feat.qualifiers.get("note") or ""
                        sub = _subtype(desc if isinstance(desc, str) else " ".join(desc))
                        if sub:
                            key = f"{name}:{sub}"
                            labels.setdefault(key, np.zeros(len(seq), dtype=bool))[idx] = True
                acc = entry.accessions[0] if entry.accessions else entry.entry_name
                records.append(ProteinRecord(acc, seq, labels))
    if not records:
        raise ValueError("no Swiss-Prot entries were read; check that the files are UniProt flat files.")
    for r in records:
        for key, mask in r.labels.items():
            if ":" in key:
                subtype_residues[key] = subtype_residues.get(key, 0) + int(mask.sum())
    keep = {k for k, n in subtype_residues.items() if n >= min_subtype_residues}
    for r in records:
        for key in list(r.labels):
            if ":" in key and key not in keep:
                del r.labels[key]
        for key in keep:
            r.labels.setdefault(key, np.zeros(len(r), dtype=bool))
    return records


def label_names(records: Sequence[ProteinRecord]) -> list[str]:
    """Annotation names in a stable order: base types first (as requested), then sub-types sorted."""
    names = list(records[0].labels)
    base = [n for n in names if ":" not in n]
    return base + sorted(n for n in names if ":" in n)


def emboss_files() -> list[Path]:
    """The Swiss-Prot flat files of Debian's emboss-test (fetched into the asset cache on first use)."""
    from saelab.assets import debian_dir

    root = debian_dir("emboss-test") / "usr" / "share" / "EMBOSS" / "test"
    return [root / "swiss" / "seq.dat", root / "data" / "uniprotft.sw"]


def crop(records: Sequence[ProteinRecord], max_length: int) -> list[ProteinRecord]:
    """Split sequences longer than `max_length` into consecutive windows (labels split alike).

    The host's context is finite (AntiBERTy: 510 residues), and the paper kept sequences under 500;
    windows keep the residues of long entries instead of dropping them.
    """
    out: list[ProteinRecord] = []
    for r in records:
        if len(r) <= max_length:
            out.append(r)
            continue
        n = -(-len(r) // max_length)
        for w in range(n):
            s = slice(w * len(r) // n, (w + 1) * len(r) // n)  # near-equal windows rather than a short tail
            out.append(
                ProteinRecord(
                    f"{r.accession}/{s.start + 1}-{s.stop}",
                    r.sequence[s],
                    {k: v[s] for k, v in r.labels.items()},
                )
            )
    return out
