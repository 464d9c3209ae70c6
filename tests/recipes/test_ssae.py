"""The `ssae` recipe end to end on tiny settings (a tiny random Llama host, real corpora and retrieval)."""

from __future__ import annotations

import json

import pytest
import torch
from support import save_tiny_causal_lm

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
    "recipe.selection.budget=8",
    "recipe.selection.pool_max_docs=40",
    "recipe.finetune.max_steps=10",
    "recipe.finetune.train_tokens=512",
    "recipe.finetune.val_tokens=256",
    "recipe.eval.domain_tokens=1024",
    "recipe.eval.general_tokens=512",
    "recipe.eval.domain.spliced.tokens=128",
    "recipe.eval.general.spliced.tokens=64",
    "recipe.eval.domain.spliced.l0_at_k=[4]",
]
SAES = ("general", "erm", "term")


def test_experiment_composes_with_the_recipe_stages(cfg_factory):
    cfg = cfg_factory(["+experiment=ssae_physics"])
    rc = cfg.recipe
    assert rc.name == "ssae" and cfg.data._target_ == "saelab.data.text.TextActivations"
    assert cfg.data.d_in == 576 and cfg.sae.d_in == 576
    assert cfg.data.corpus.name == "general" and cfg.data.val_corpus.split == "test"
    # corpora from the recipe's defaults list land under `recipe`
    assert rc.seed_corpus.name == "physics_seed" and rc.test_corpus.name == "physics"
    assert rc.test_corpus.split == "test" and rc.hidden_corpus.name == "physics_pool"
    # the fine-tunes are config: one stage per objective, TERM with its own settings
    assert list(rc.finetune.objectives) == ["erm", "term"]
    assert list(rc.finetune.objectives.erm) == ["mse", "auxk"]
    assert set(rc.finetune.objectives.term) == {"tilted", "auxk"}
    tilted = rc.finetune.objectives.term.tilted
    assert tilted._target_ == "saelab.objectives.Tilted"
    assert (tilted.t, tilted.scale, tilted.coeff) == (1.0, "mean", 1.0)
    assert list(cfg.objective.terms) == ["mse", "auxk"]  # the general SAE
    assert rc.finetune.val_tokens == rc.eval.domain_tokens == 16384
    assert rc.eval.general_tokens == cfg.data.val_tokens == 8192
    # evaluator sets per held-out source
    assert list(rc.eval.domain) == ["core", "spliced", "coverage"]
    assert list(rc.eval.general) == ["core", "spliced"]
    d, g = rc.eval.domain, rc.eval.general
    assert d.core.n_batches is None and g.core.n_batches is None
    assert (d.spliced.tokens, d.spliced.batch_size, list(d.spliced.l0_at_k)) == (2048, 8, [16, 64])
    assert (g.spliced.tokens, g.spliced.batch_size, list(g.spliced.l0_at_k)) == (1024, 8, [])
    assert (d.coverage.min_recall, d.coverage.min_purity, d.coverage.min_count) == (0.5, 0.2, 2)
    assert list(d.coverage.edges) == [0, 1, 10, 100, 1000, 10000]
    assert "ssae" not in cfg


def test_debug_tiny_shrinks_the_recipe(cfg_factory):
    from saelab.train import apply_debug

    cfg = apply_debug(cfg_factory(["+experiment=ssae_physics", "+debug=tiny"]))
    rc = cfg.recipe
    assert cfg.trainer.max_steps == 20 and cfg.data.train_tokens == 8192 and not cfg.logger
    assert rc.finetune.max_steps == 10 and rc.selection.pool_max_docs == 120 and rc.selection.budget == 16
    assert rc.eval.domain_tokens == rc.finetune.val_tokens == 1024  # the interpolation survives
    assert rc.eval.domain.spliced.tokens == 127 and rc.eval.general.spliced.tokens == 127


def _per(metrics: dict, sae: str, source: str) -> dict:
    """The `<sae>/<source>/<metric>` entries of results.json `metrics`, by metric name."""
    head = f"{sae}/{source}/"
    return {k.removeprefix(head): v for k, v in metrics.items() if k.startswith(head)}


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
    assert saved == json.loads(json.dumps(res))
    for name in SAES:
        for dom in ("domain", "general"):
            m = _per(saved["metrics"], name, dom)
            assert m["l0"] == pytest.approx(8.0)  # TopK(8), positive codes
            assert -1.0 < m["explained_variance"] <= 1.0
            want = (m["ce_zero"] - m["ce_sae"]) / (m["ce_zero"] - m["ce_clean"])
            assert m["ce_loss_score"] == pytest.approx(want)
            assert m["spliced_ppl"] == pytest.approx(torch.tensor(m["ce_sae"]).exp().item(), rel=1e-6)
            # core reads the whole held-out harvest: the token budget rounded up to whole contexts of 127
            budget = {"domain": 1024, "general": 512}[dom]
            assert budget <= m["n_tokens"] < budget + 127
        assert _per(saved["metrics"], name, "domain")["spliced_tokens"] <= 128 + 127
        assert _per(saved["metrics"], name, "general")["spliced_tokens"] <= 64 + 127
        assert "coverage" not in _per(saved["metrics"], name, "general")
        cov = saved["eval"][f"{name}/domain"]["coverage"]
        assert sum(cov["bin_tokens"]) >= 1024 and 0.0 <= cov["total_coverage"] <= 1.0
        assert [p["l0"] for p in saved["ppl_vs_l0"][name]] == pytest.approx([4.0, 8.0])
        own = saved["ppl_vs_l0"][name][1]["spliced_ppl"]
        assert own == _per(saved["metrics"], name, "domain")["spliced_ppl"]
        assert saved["stages"][name]["export"] == str(run_dir / name / "sae")
    # same clean model on the same text for every SAE
    assert len({_per(saved["metrics"], n, "domain")["ce_clean"] for n in SAES}) == 1
    # selection: dense and the BM25 baseline each picked the budget from the pool
    sel = saved["selection"]
    assert sel["pool_docs"] == 40 and sel["dense"]["n_docs"] == 8 and sel["bm25"]["n_docs"] == 8
    assert saved["metrics"]["selection/bm25/n_docs"] == 8
    assert (run_dir / "select" / "dense.json").exists() and (run_dir / "select" / "bm25.json").exists()
    # fine-tunes start from the general export and move away from it; TERM trained with the tilted term
    g = load_sae(run_dir / "general" / "sae")
    for stage in ("erm", "term"):
        s = load_sae(run_dir / stage / "sae")
        diff = (s.W_dec - g.W_dec).norm() / g.W_dec.norm()
        assert 0 < diff < 0.5
        conf = torch.load(run_dir / "checkpoints" / stage / "last.ckpt", weights_only=False)["saelab_config"]
        terms = conf["objective"]["terms"]
        assert set(terms) == ({"mse", "auxk"} if stage == "erm" else {"tilted", "auxk"})
        assert conf["sae"]["init_from"] == str(run_dir / "general" / "sae")
        assert conf["trainer"]["max_steps"] == 10 and conf["optim"]["optimizer"]["lr"] == 0.0003
    assert terms["tilted"]["t"] == 1.0 and terms["tilted"]["scale"] == "mean"
    for f in ("report.md", "ppl_vs_l0.png", "coverage.png"):
        assert (run_dir / f).stat().st_size > 0
    report = (run_dir / "report.md").read_text()
    for section in ("## Comparison", "## Tail-token coverage", "## Perplexity vs L0", "## Data selection"):
        assert section in report
    assert "ppl_vs_l0.png" in report and "coverage.png" in report and "| term |" in report
    assert "| (clean model) |" in report
