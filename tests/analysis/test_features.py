"""Feature records: streamed top-k, counts, histogram and quantile samples against a dense [tokens, d_sae]
matrix computed here, windows inside documents, the save/load round trip, the two bad inputs, and a tiny
causal LM through the activation cache and straight from the host."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saelab.analysis.features import FeatureRecords, collect_feature_records
from saelab.data.text import ActivationStore, TextActivations
from saelab.sae import SAE, ReLU, TopK

D_IN, D_SAE = 8, 24
DOC_LENGTHS = [7, 30, 1, 12, 50, 20]  # 120 rows


class _StoreSource:
    """A split held in memory: random activations, documents laid out one after another."""

    def __init__(self, act_scale: float = 1.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        n = sum(DOC_LENGTHS)
        self.acts = torch.randn(n, D_IN, generator=g)
        self.token_ids = torch.randint(2, 500, (n,), generator=g)
        self.doc_id = torch.cat([torch.full((L,), d) for d, L in enumerate(DOC_LENGTHS)])
        self.doc_pos = torch.cat([torch.arange(L) for L in DOC_LENGTHS])
        self.act_scale = act_scale
        self._store = ActivationStore(
            self.acts, self.token_ids, {"doc_id": self.doc_id, "doc_pos": self.doc_pos}
        )

    def store(self, split: str) -> ActivationStore:
        return self._store


def _dense(sae, src) -> torch.Tensor:
    """The brute-force [tokens, d_sae] codes in host units."""
    with torch.no_grad():
        return sae.encode(src.acts * src.act_scale) / src.act_scale


SAES = {"relu": lambda: SAE(D_IN, D_SAE, ReLU(), seed=3), "topk": lambda: SAE(D_IN, D_SAE, TopK(4), seed=3)}


@pytest.mark.parametrize("kind", list(SAES))
@pytest.mark.parametrize("batch", [7, 1000])
def test_streamed_top_k_equals_brute_force(kind, batch):
    src, sae = _StoreSource(act_scale=2.5), SAES[kind]().eval()
    rec = collect_feature_records(sae, src, top_k=5, window=(2, 1), batch=batch, reservoir=16)
    f = _dense(sae, src)
    for j in range(D_SAE):
        pos = torch.nonzero(f[:, j] > 0).squeeze(1)
        best = pos[f[pos, j].argsort(descending=True, stable=True)][:5]
        got = rec.top_row[j][rec.top_row[j] >= 0]
        assert got.tolist() == best.tolist(), j
        torch.testing.assert_close(rec.top_act[j, : len(best)], f[best, j], rtol=1e-5, atol=1e-6)


def test_counts_density_and_histogram_equal_direct_counts():
    src, sae = _StoreSource(), SAES["relu"]().eval()
    rec = collect_feature_records(sae, src, n_bins=10, log10_range=(-2.0, 0.5), batch=16, reservoir=16)
    f = _dense(sae, src)
    assert rec.n_tokens == f.shape[0]
    assert rec.count.tolist() == (f > 0).sum(0).tolist()
    torch.testing.assert_close(rec.density, (f > 0).double().mean(0))
    torch.testing.assert_close(rec.act_sum, f.clamp_min(0).double().sum(0), rtol=1e-5, atol=1e-6)
    edges = rec.hist_edges.numpy()
    for j in range(D_SAE):
        v = f[:, j][f[:, j] > 0].double().numpy().clip(edges[0], edges[-1])  # ends catch the outliers
        assert rec.hist[j].tolist() == np.histogram(v, edges)[0].tolist(), j
    assert rec.hist.sum().item() == rec.count.sum().item()


def test_token_budget_stops_the_stream():
    src, sae = _StoreSource(), SAES["relu"]().eval()
    rec = collect_feature_records(sae, src, n_tokens=50, reservoir=16)
    f = _dense(sae, src)[:50]
    assert rec.n_tokens == 50 and rec.count.tolist() == (f > 0).sum(0).tolist()
    assert int(rec.top_row.max()) < 50


def test_windows_stay_inside_the_document_and_carry_the_latents_activation():
    src, sae = _StoreSource(), SAES["topk"]().eval()
    left, right = 3, 2
    rec = collect_feature_records(sae, src, top_k=6, window=(left, right), reservoir=32, per_quantile=2)
    f = _dense(sae, src)
    for prefix in ("top", "sample"):
        rows, acts = getattr(rec, f"{prefix}_row"), getattr(rec, f"{prefix}_act")
        toks, wacts = getattr(rec, f"{prefix}_tokens"), getattr(rec, f"{prefix}_window_acts")
        docs, pos = getattr(rec, f"{prefix}_doc"), getattr(rec, f"{prefix}_pos")
        for j, s in torch.nonzero(rows >= 0).tolist():
            r = int(rows[j, s])
            assert (int(docs[j, s]), int(pos[j, s])) == (int(src.doc_id[r]), int(src.doc_pos[r]))
            torch.testing.assert_close(wacts[j, s, left], acts[j, s], rtol=1e-5, atol=1e-6)
            for o in range(-left, right + 1):
                t = r + o
                inside = 0 <= t < len(src.doc_id) and src.doc_id[t] == src.doc_id[r]
                want_tok = int(src.token_ids[t]) if inside else -1
                want_act = float(f[t, j]) if inside else 0.0
                assert int(toks[j, s, left + o]) == want_tok
                assert float(wacts[j, s, left + o]) == pytest.approx(want_act, rel=1e-5, abs=1e-6)


def test_quantile_samples_are_firing_positions_binned_by_activation():
    src, sae = _StoreSource(), SAES["relu"]().eval()
    # reservoir ≥ every latent's firing count: the sample is all firing positions, bins are exact quantiles
    rec = collect_feature_records(sae, src, n_quantiles=4, per_quantile=3, reservoir=200, batch=9)
    f = _dense(sae, src)
    for j in range(D_SAE):
        r = rec.latent(j)
        assert len(r.samples) == min(12, r.count) or r.count < 4 * 3
        firing = f[:, j][f[:, j] > 0].sort().values
        n = firing.numel()
        rows = rec.sample_row[j][rec.sample_row[j] >= 0]
        for c, row in zip(r.samples, rows.tolist(), strict=True):
            assert c.act == pytest.approx(float(f[row, j]), rel=1e-5)
            q = c.quantile
            assert q is not None
            # bin q holds sorted positions p with ⌊p·4 / n⌋ = q
            lo_, hi_ = -(-q * n // 4), -(-(q + 1) * n // 4)
            assert float(firing[lo_]) <= c.act + 1e-6 and c.act <= float(firing[hi_ - 1]) + 1e-6
        qs = [c.quantile for c in r.samples]
        assert qs == sorted(qs)
        if n >= 12:
            assert sorted(qs) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_reservoir_smaller_than_firing_count_keeps_a_sample_of_firing_positions():
    src, sae = _StoreSource(), SAES["relu"]().eval()
    rec = collect_feature_records(sae, src, n_quantiles=2, per_quantile=2, reservoir=4, batch=5)
    f = _dense(sae, src)
    for j, s in torch.nonzero(rec.sample_row >= 0).tolist():
        r = int(rec.sample_row[j, s])
        assert f[r, j] > 0
        assert float(rec.sample_act[j, s]) == pytest.approx(float(f[r, j]), rel=1e-5)


def test_save_load_round_trip(tmp_path):
    src, sae = _StoreSource(), SAES["topk"]().eval()
    rec = collect_feature_records(sae, src, top_k=3, window=(1, 1), reservoir=16)
    folder = rec.save(tmp_path / "run", decode=lambda t: f"<{t}>")
    assert sorted(p.name for p in folder.iterdir()) == ["latents.jsonl", "meta.json", "records.safetensors"]
    back = FeatureRecords.load(tmp_path / "run")
    for k in FeatureRecords._ARRAYS:
        assert torch.equal(getattr(back, k), getattr(rec, k)), k
    assert (back.n_tokens, back.window, back.log10_range) == (rec.n_tokens, rec.window, rec.log10_range)
    assert back.meta == rec.meta and back.latent(5) == rec.latent(5)
    assert FeatureRecords.load(folder).latent(0) == rec.latent(0)
    lines = (folder / "latents.jsonl").read_text().splitlines()
    assert len(lines) == D_SAE
    first = json.loads(lines[0])
    assert first["latent"] == 0 and first["count"] == rec.latent(0).count
    if first["top"]:
        c = first["top"][0]
        assert c["text"] == [f"<{t}>" if t >= 0 else None for t in c["tokens"]]


def test_latent_out_of_range_says_the_range():
    rec = collect_feature_records(SAES["relu"]().eval(), _StoreSource(), reservoir=16)
    with pytest.raises(IndexError, match=r"latent 5000 is out of range: this SAE has 24 latents \(0–23\)"):
        rec.latent(5000)
    with pytest.raises(IndexError, match="latent -1 is out of range"):
        rec.latent(-1)


def test_run_dir_without_records_says_what_to_run(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no feature records.*collect_feature_records\(sae, source\)"
    ):
        FeatureRecords.load(tmp_path)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="reservoir ≥ n_quantiles"):
        collect_feature_records(SAES["relu"](), _StoreSource(), n_quantiles=10, reservoir=4)
    with pytest.raises(ValueError, match="window"):
        collect_feature_records(SAES["relu"](), _StoreSource(), window=(-1, 2), reservoir=16)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from support import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "llama", "llama", n_layers=2, hidden=32)


def test_tiny_text_source_through_cache_and_host_alike(tmp_path, tiny_lm):
    from support import SENTENCES

    from saelab.hosts.causal_lm import CausalLMHost

    def source(cache: bool) -> TextActivations:
        return TextActivations(
            CausalLMHost(str(tiny_lm), hook=1, d_in=32), SENTENCES, SENTENCES[::-1], context_len=16,
            train_tokens=60, val_tokens=60, batch_size=8, harvest_batch=2, cache=cache,
            cache_dir=str(tmp_path / "cache"), normalize=True,
        )  # fmt: skip

    sae = SAE(32, 48, TopK(6), seed=0).eval()
    cached, live = source(True), source(False)
    kw = {"top_k": 4, "window": (5, 2), "batch": 13, "reservoir": 16, "n_quantiles": 4, "per_quantile": 2}
    a = collect_feature_records(sae, cached, **kw)
    b = collect_feature_records(sae, live, **kw)
    assert a.meta["act_scale"] == pytest.approx(cached.act_scale) and a.meta["act_scale"] != 1.0
    assert a.count.tolist() == b.count.tolist() and a.top_row.tolist() == b.top_row.tolist()
    assert a.top_tokens.tolist() == b.top_tokens.tolist() and a.sample_row.tolist() == b.sample_row.tolist()
    torch.testing.assert_close(a.top_window_acts, b.top_window_acts, rtol=1e-4, atol=1e-5)

    docs, pos, ids = (cached.column("val", c) for c in ("doc_id", "doc_pos", "token_ids"))
    x = torch.from_numpy(cached.store("val").rows(np.arange(len(ids)), ["acts"])["acts"]).float()
    s = cached.act_scale
    f = sae.encode(x * s).detach() / s
    assert a.n_tokens == len(ids) and a.count.tolist() == (f > 0).sum(0).tolist()
    for j in range(48):
        best = torch.nonzero(f[:, j] > 0).squeeze(1)
        best = best[f[best, j].argsort(descending=True, stable=True)][:4]
        assert a.top_row[j][: len(best)].tolist() == best.tolist()
        for slot, r in enumerate(best.tolist()):
            assert (int(a.top_doc[j, slot]), int(a.top_pos[j, slot])) == (int(docs[r]), int(pos[r]))
            assert int(a.top_tokens[j, slot, 5]) == int(ids[r])
            torch.testing.assert_close(a.top_window_acts[j, slot, 5], f[r, j], rtol=1e-4, atol=1e-5)
    # a window of the first position of a document has nothing on its left
    firsts = [(j, s_) for j, s_ in torch.nonzero(a.top_row >= 0).tolist() if int(a.top_pos[j, s_]) == 0]
    for j, s_ in firsts:
        assert a.top_tokens[j, s_, :5].tolist() == [-1] * 5
