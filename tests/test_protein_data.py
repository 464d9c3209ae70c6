"""ProteinDataModule: residues line up with labels, split by sequence, normalised, resumable, cached."""

from __future__ import annotations

import pytest
import torch
from test_protein_host import make_tiny_esm
from test_protein_recipe import _flatfile

from saelab.data.protein import ProteinDataModule
from saelab.hosts.masked_lm import load_masked_lm


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("pd")
    return load_masked_lm(str(make_tiny_esm(d / "esm")), hook=1), _flatfile(d / "e.dat")


def _dm(parts, **kw):
    host, files = parts
    args = dict(files=[str(files)], annotations=["transmembrane", "zinc_finger"], cache=False, batch_size=32)
    args.update(kw)
    return ProteinDataModule(host, 16, **args)


def test_residues_labels_and_split(parts):
    dm = _dm(parts)
    dm.setup()
    n = sum(len(r) for r in dm.records)
    assert dm.acts.shape == (n, 16) and dm.labels.shape == (n, 4)
    # the transmembrane label sits on the 19 residues after the 5-residue prefix of every sequence
    first = dm.seq_of == 0
    tm = dm.labels[first, dm.label_names.index("transmembrane")]
    assert tm.nonzero().squeeze(1).tolist() == list(range(5, 24))
    # token ids are the residues themselves
    assert dm.host.decode(torch.tensor([0, *dm.token_ids[first].tolist(), 2])) == dm.records[0].sequence
    # split by sequence: a sequence is wholly train or wholly val
    for i in range(len(dm.records)):
        assert dm.is_val[dm.seq_of == i].unique().numel() == 1
    assert len(dm.val_seqs) == round(0.15 * len(dm.records))
    # normalised so that the mean squared norm over training residues is d_in
    assert dm.train_acts.pow(2).sum(1).mean().item() == pytest.approx(16.0, rel=1e-4)


def test_train_stream_resumes_at_a_step(parts):
    dm = _dm(parts)
    dm.setup()
    it = iter(dm.train_dataloader())
    batches = [next(it)["acts"] for _ in range(5)]
    dm.load_state_dict({"position": 3})
    resumed = next(iter(dm.train_dataloader()))["acts"]
    torch.testing.assert_close(resumed, batches[3])
    assert sum(b["acts"].shape[0] for b in dm.val_dataloader()) == int(dm.is_val.sum())


def test_harvest_cache_round_trip(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    a = _dm(parts, cache=True)
    a.setup()
    files = list((tmp_path / "cache" / "protein_acts").glob("*.pt"))
    assert len(files) == 1
    b = _dm(parts, cache=True)

    def no_harvest(*args, **kwargs):
        raise AssertionError("a second build must read the cache, not harvest again")

    monkeypatch.setattr(b.host, "residue_activations", no_harvest)
    b.setup()
    torch.testing.assert_close(a.acts, b.acts)


def test_bad_width_is_reported(parts):
    host, files = parts
    with pytest.raises(ValueError, match="set data.d_in"):
        ProteinDataModule(host, 320, files=[str(files)])
