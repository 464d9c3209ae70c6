"""The `ssae` recipe end to end on tiny settings (a tiny random Llama host, real corpora and retrieval)."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.hosts.causal_lm import save_tiny_causal_lm
from saelab.io import load_sae
from saelab.recipes import ssae

TINY = [
    "logger=none",
    "data.host.d_in=32",
    "data.host.hook=1",
    "data.train_tokens=2048",
    "data.val_tokens=512",
    "data.batch_size=128",
    "sae.d_sae=64",
    "sae.activation.k=8",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "checkpoint.every_n_steps=10",
    "ssae.selection.n_docs=8",
    "ssae.selection.pool_max_docs=40",
    "ssae.finetune.max_steps=10",
    "ssae.finetune.train_tokens=512",
    "ssae.finetune.val_tokens=256",
    "ssae.eval.domain_tokens=1024",
    "ssae.eval.general_tokens=512",
    "ssae.eval.spliced_tokens=128",
    "ssae.eval.general_spliced_tokens=64",
    "ssae.eval.l0_sweep=[4]",
]


def test_experiment_composes_with_the_recipe_stages(cfg_factory):
    cfg = cfg_factory(["+experiment=ssae_physics"])
    assert cfg.recipe.name == "ssae" and cfg.data._target_ == "saelab.data.text.TextActivations"
    assert cfg.data.d_in == 576 and cfg.sae.d_in == 576
    assert cfg.data.corpus.name == "general" and cfg.data.val_corpus.split == "test"
    assert cfg.ssae.seed_corpus.name == "physics_seed" and cfg.ssae.test_corpus.split == "test"
    assert cfg.ssae.finetune.tilted._target_ == "saelab.objectives.Tilted"


@pytest.mark.slow
def test_ssae_tiny_end_to_end(cfg_factory, tmp_path):
    host_dir = save_tiny_causal_lm(tmp_path / "tiny", "llama", n_layers=3, hidden=32)
    run_dir = tmp_path / "run"
    cfg = cfg_factory(
        [
            "+experiment=ssae_physics",
            *TINY,
            f"data.host.model={host_dir}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"+run_dir={run_dir}",
        ]
    )
    res = ssae.run(cfg)

    saved = json.loads((run_dir / "results.json").read_text())
    assert set(saved["metrics"]) == {"general", "erm", "term"}
    for name in ("general", "erm", "term"):
        for dom in ("domain", "general"):
            m = res["metrics"][name][dom]
            assert m["l0"] == pytest.approx(8.0)  # TopK(8), positive codes
            assert -1.0 < m["explained_variance"] <= 1.0
            want = (m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"])
            assert m["ce_loss_score"] == pytest.approx(want)
            assert m["spliced_ppl"] == pytest.approx(torch.tensor(m["ce_sae"]).exp().item(), rel=1e-6)
        cov = res["metrics"][name]["domain"]["coverage"]
        assert sum(cov["bin_tokens"]) >= 1024 and 0.0 <= cov["total_coverage"] <= 1.0
        assert [p["l0"] for p in saved["ppl_vs_l0"][name]] == pytest.approx([4.0, 8.0])
    # same clean model on the same text for every SAE
    assert len({res["metrics"][n]["domain"]["ce_clean"] for n in ("general", "erm", "term")}) == 1
    # selection: dense and the BM25 baseline each picked the budget from the pool
    sel = saved["selection"]
    assert sel["pool_docs"] == 40 and sel["dense"]["n_docs"] == 8 and sel["bm25"]["n_docs"] == 8
    assert (run_dir / "select" / "dense.json").exists()
    # fine-tunes start from the general export and move away from it; TERM trained with the tilted term
    g = load_sae(run_dir / "general" / "sae")
    for stage in ("erm", "term"):
        s = load_sae(run_dir / stage / "sae")
        diff = (s.W_dec - g.W_dec).norm() / g.W_dec.norm()
        assert 0 < diff < 0.5
        conf = torch.load(run_dir / "checkpoints" / stage / "last.ckpt", weights_only=False)["saelab_config"]
        assert ("tilted" in conf["objective"]["terms"]) == (stage == "term")
        assert "mse" not in conf["objective"]["terms"] or stage == "erm"
        assert conf["sae"]["init_from"] == str(run_dir / "general" / "sae")
    for f in ("report.md", "ppl_vs_l0.png", "coverage.png"):
        assert (run_dir / f).stat().st_size > 0
    report = (run_dir / "report.md").read_text()
    assert "ppl_vs_l0.png" in report and "coverage.png" in report and "| term |" in report


def test_coverage_table_leaves_out_bins_without_test_tokens():
    cov = {
        name: {"domain": {"coverage": {"bins": ["0", "1–9", "≥10"], "bin_tokens": [5, 0, 7], "coverage": c}}}
        for name, c in (
            ("general", [0.2, float("nan"), 1.0]),
            ("erm", [0.4, float("nan"), 0.5]),
            ("term", [0.6, 0.0, 0.25]),
        )
    }
    headers, rows = ssae._coverage_table(cov)
    assert headers == ["corpus count", "test tokens", "general", "erm", "term"]
    assert rows == [["0", 5, 0.2, 0.4, 0.6], ["≥10", 7, 1.0, 0.5, 0.25]]
