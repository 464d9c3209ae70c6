"""Masked protein-LM host on a tiny random EsmForMaskedLM (real ESM tokenizer), steering and fidelity."""

from __future__ import annotations

import pytest
import torch
from support import make_tiny_esm

from saelab.analysis.protein_steering import (
    generate,
    has_c2h2,
    has_tm_segment,
    max_hydropathy,
    score_generations,
)
from saelab.edit import LatentEdit
from saelab.eval.protein_fidelity import protein_fidelity
from saelab.hosts.masked_lm import load_masked_lm
from saelab.sae import SAE, TopK


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return load_masked_lm(str(make_tiny_esm(tmp_path_factory.mktemp("esm"))), hook=1, d_in=16)


def test_tokenisation_uses_esm_vocab(host):
    b = host.encode(["MKT", "AC"])
    assert b.input_ids[0].tolist() == [0, 20, 15, 11, 2]  # <cls> M K T <eos>
    assert b.input_ids[1].tolist() == [0, 5, 23, 2, 1]  # <cls> A C <eos> <pad>
    assert b.residues.tolist() == [[False, True, True, True, False], [False, True, True, False, False]]
    assert host.decode(b.input_ids[0]) == "MKT"


def test_residue_activations_exclude_special_and_padding(host):
    seqs = ["MKTAYIAKQR", "ACD", "WWHHC"]
    acts, ids = host.residue_activations(seqs, batch_size=2, progress=False)
    assert acts.shape == (18, 16) and ids.shape == (18,)
    # reference: each sequence alone, full forward, block 1 output = hidden_states[2] (not the last,
    # which ESM passes through its final layer norm)
    ref = []
    for s in seqs:
        b = host.encode([s])
        out = host.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
        ref.append(out.hidden_states[2][0, 1 : len(s) + 1])
    torch.testing.assert_close(acts, torch.cat(ref), atol=1e-5, rtol=1e-4)


def test_wrong_hook_lists_valid_ones(tmp_path):
    d = make_tiny_esm(tmp_path / "m")
    with pytest.raises(ValueError, match="esm.encoder.layer.0"):
        load_masked_lm(str(d), hook="esm.encoder.nope")
    with pytest.raises(ValueError, match="set data.d_in=16"):
        load_masked_lm(str(d), hook=1, d_in=320)


def _sae(d_in: int = 16, d_sae: int = 32, k: int = 4) -> SAE:
    return SAE(d_in, d_sae, TopK(k), seed=0).eval()


def test_zero_clamp_equals_unsteered_generation(host):
    sae = _sae()
    base = generate(host, n=5, length=20, rounds=4, seed=3, batch_size=3)
    zero = LatentEdit(sae, [0, 5, 7], "clamp", 0.0, scale=1.7)
    steered = generate(host, n=5, length=20, rounds=4, seed=3, intervention=zero, batch_size=3)
    assert steered == base
    assert all(len(s) == 20 and set(s) <= set("ACDEFGHIKLMNPQRSTVWY") for s in base)
    # a strong clamp does change the model's output distribution (the hook is live)
    b = host.encode(["MKTAYIAKQR"])
    clean = host.logits(b.input_ids, b.attention_mask)
    with host.spliced(LatentEdit(sae, [0, 5, 7], "clamp", 50.0)):
        pushed = host.logits(b.input_ids, b.attention_mask)
    assert (pushed - clean).abs().max() > 1e-3


def test_seed_sequence_keeps_unmasked_residues(host):
    seqs = generate(host, n=3, length=0, rounds=3, seed=1, seed_sequence="MKTXXXXAYW")
    assert all(s[:3] == "MKT" and s[7:] == "AYW" and len(s) == 10 for s in seqs)


def test_motif_and_hydrophobic_detectors():
    zf = "MSRPYKCPECGKSFSQSSNLQKHQRTHTGEKP"  # a classic C2H2 finger (Zif268-like)
    assert has_c2h2(zf)
    assert not has_c2h2(zf.replace("H", "A"))
    tm = "MKRS" + "LLVALIAGLLFVAVLLIAL" + "RKDE"
    assert has_tm_segment(tm)
    assert max_hydropathy("LLVALIAGLLFVAVLLIAL") == pytest.approx(
        sum({"L": 3.8, "V": 4.2, "A": 1.8, "I": 4.5, "G": -0.4, "F": 2.8}[c] for c in "LLVALIAGLLFVAVLLIAL")
        / 19
    )
    assert not has_tm_segment("MKRSDEKRSTQNDEKRSTQNDEKRS")
    sc = score_generations([zf, tm, "AAAA"], "zinc_finger:C2H2-type")
    assert sc["successes"] == 1 and sc["n"] == 3


def test_fidelity_of_exact_splice_is_perfect(host):
    class Exact(torch.nn.Module):
        """An 'SAE' whose reconstruction is its input."""

        d_sae = 1

        def forward(self, x):
            return type("O", (), {"x_hat": x})()

    seqs = ["MKTAYIAKQRQISFVKSHFS", "ACDEFGHIKLMNPQRSTVWY", "WWHHCCAAGG"]
    fid = protein_fidelity(host, Exact(), 2.0, seqs, mask_fraction=0.3, batch_size=2, seed=0)
    assert fid["recovery"] == 1.0
    assert fid["kl"] == pytest.approx(0.0, abs=1e-6)
    assert fid["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    assert fid["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert fid["n_residues"] == 50 and 0 < fid["n_masked"] < 50
    noisy = protein_fidelity(host, _sae(), 1.0, seqs, mask_fraction=0.3, batch_size=2, seed=0)
    assert noisy["kl"] > 0 and noisy["n_masked"] == fid["n_masked"]  # same seeded masks


def test_antiberty_loads_and_predicts_masked_residues():
    """The embedded offline host: a VH sequence with every 7th residue masked is mostly recovered."""
    from saelab.hosts.masked_lm import load_antiberty

    h = load_antiberty("bert.encoder.layer.4")
    assert h.d_in == 512 and h.max_residues == 510
    vh = "EVQLVESGGGLVQPGGSLRLSCAASGFTFSSYAMSWVRQAPGKGLEWVSAISGSGGSTYYADSVKGRFTISRDNSKNTLYLQMNSLRAEDTAVYYCAK"
    b = h.encode([vh])
    ids = b.input_ids.clone()
    pos = torch.arange(1, len(vh) + 1, 7)
    ids[0, pos] = h.mask_id
    pred = h.logits(ids, b.attention_mask)[0, pos].argmax(-1)
    assert (pred == b.input_ids[0, pos]).float().mean() > 0.7


def test_fidelity_shows_progress(host, capsys):
    protein_fidelity(host, _sae(), 1.0, ["MKTAYIAKQR", "ACDEFGHIKL", "WWHHCCAAGG"], batch_size=2)
    assert "protein fidelity (3 sequences)" in capsys.readouterr().err  # a tqdm bar, one tick per batch
