"""ProteinDataModule: residues line up with labels, split by sequence, normalised, resumable, cached."""

from __future__ import annotations

import pytest
import torch
from support import make_tiny_esm, swissprot_flatfile

from saelab.data.cache import ActivationCache, cache_key
from saelab.data.protein import ProteinDataModule
from saelab.hosts.masked_lm import load_masked_lm


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("pd")
    return load_masked_lm(str(make_tiny_esm(d / "esm")), hook=1), swissprot_flatfile(d / "e.dat")


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
    batches = [next(it) for _ in range(5)]
    dm.load_state_dict({"position": 3})
    resumed = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(resumed["acts"], batches[3]["acts"], rtol=0, atol=0)
    assert sum(b["acts"].shape[0] for b in dm.val_dataloader()) == int(dm.is_val.sum())
    # batches are scaled training residues, each at most once per epoch, with their token ids
    train = dm.train_acts
    per_epoch = int((~dm.is_val).sum()) // 32
    rows = torch.cat([b["acts"] for b in batches[: min(5, per_epoch)]])
    assert len(rows.unique(dim=0)) == len(rows)
    for b in batches:
        hit = (b["acts"][:, None, :] == train[None]).all(-1)  # [batch, n_train]
        assert (hit.sum(1) >= 1).all()
        assert set(b) == {"acts", "token_ids"} and b["token_ids"].shape == (32,)
    assert dm.scale == dm.act_scale != 1.0


def test_harvest_cache_round_trip(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    a = _dm(parts, cache=True)
    a.setup()
    # one entry of the shared activation cache, keyed by what determines the activations
    manifests = list((tmp_path / "cache" / "activations").glob("*/manifest.json"))
    assert len(manifests) == 1
    store = ActivationCache(manifests[0].parent)
    parts_ = a.cache_parts([r.sequence for r in a.records])
    assert store.key == cache_key(**parts_) and store.n_tokens == len(a.acts)
    # the same as harvesting without the cache, bit for bit
    c = _dm(parts, cache=False)
    c.setup()
    assert torch.equal(c.acts, a.acts) and torch.equal(c.token_ids, a.token_ids)
    b = _dm(parts, cache=True)

    def no_harvest(*args, **kwargs):
        raise AssertionError("a second build must read the cache, not harvest again")

    monkeypatch.setattr(b.host, "residue_activations", no_harvest)
    b.setup()
    torch.testing.assert_close(a.acts, b.acts, rtol=0, atol=0)
    assert torch.equal(a.token_ids, b.token_ids) and a.act_scale == b.act_scale
    # other sequences (or another host, hook or width) are another key
    assert cache_key(**a.cache_parts([r.sequence for r in a.records[1:]])) != store.key


def test_bad_width_is_reported(parts):
    host, files = parts
    with pytest.raises(ValueError, match="set data.d_in"):
        ProteinDataModule(host, 320, files=[str(files)])
