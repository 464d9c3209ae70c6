"""The `boost` recipe (SAE Boost): its config, the base+both composition, the residual-latent counts, and a
run end to end at `+debug=tiny` through the CLI on the embedded host."""

from __future__ import annotations

import json

import pytest
import torch
from support import run_cli

from saelab.io import load_sae, save_sae
from saelab.recipes import boost
from saelab.sae import SAE, BatchTopK, ResidualSAE


def test_experiment_composes_with_the_recipe_stages(cfg_factory):
    cfg = cfg_factory(["+experiment=boost_domain"])
    rc = cfg.recipe
    assert rc.name == "boost" and cfg.data._target_ == "saelab.data.text.TextActivations"
    # the base: BatchTopK + AuxK on general text without the biomedical domain
    assert cfg.data.corpus.name == cfg.data.val_corpus.name == "general_nobio"
    assert (cfg.data.corpus.split, cfg.data.val_corpus.split) == ("train", "test")
    assert cfg.sae._target_ == "saelab.sae.SAE" and cfg.sae.activation._target_ == "saelab.sae.BatchTopK"
    assert (cfg.sae.d_sae, cfg.sae.activation.k) == (2048, 32) and list(cfg.objective.terms) == [
        "mse",
        "auxk",
    ]
    # the domains: physics retrieved (dense only), PubMedQA read; both held out by split
    assert list(rc.domains) == ["physics", "bio"] and rc.domains.physics.train is None
    assert list(rc.selection.methods) == ["dense"] and rc.seed_corpus.name == "physics_seed"
    assert (rc.domains.physics.test.name, rc.domains.physics.test.split) == ("physics", "test")
    assert (rc.domains.bio.train.name, rc.domains.bio.train.split) == ("pubmedqa", "train")
    assert (rc.domains.bio.test.name, rc.domains.bio.test.split) == ("pubmedqa", "test")
    # the residual SAE: sae=residual (no decoder bias, BatchTopK), 1/8 of the base's width and k
    res = rc.residual.sae
    assert res._target_ == "saelab.sae.ResidualSAE" and res.base.path is None
    assert (res.residual.d_sae, res.residual.activation.k) == (256, 4)
    assert res.residual.apply_b_dec_to_input is False and res.residual.d_in == cfg.data.d_in == 576
    assert rc.residual.max_steps == 400 and rc.domain_train_tokens == 60000
    assert rc.scratch.max_steps == cfg.trainer.max_steps == 1200 and rc.scratch.k is None
    assert list(rc.eval.metrics) == ["core", "spliced"] and rc.eval.metrics.spliced.tokens == 1024
    assert rc.eval.general_tokens == cfg.data.val_tokens


def test_debug_tiny_shrinks_the_recipe(cfg_factory):
    from saelab.train import apply_debug

    cfg = apply_debug(cfg_factory(["+experiment=boost_domain", "+debug=tiny"]))
    rc = cfg.recipe
    assert cfg.trainer.max_steps == 20 and cfg.sae.d_sae == 128 and not cfg.logger
    assert rc.residual.sae.residual.d_sae == 16 and rc.residual.max_steps == 10
    assert rc.domain_train_tokens == 2048 and rc.eval.metrics.spliced.tokens == 127


def test_stage_configs(cfg_factory, tmp_path):
    from saelab.stage import finetune_cfg

    cfg = cfg_factory(["+experiment=boost_domain"])
    rs = cfg.recipe.residual
    c = boost.stage_cfg(cfg, {"sae": rs.sae, "sae.base.path": str(tmp_path), "trainer.max_steps": 7})
    assert c.sae._target_ == "saelab.sae.ResidualSAE" and c.sae.base.path == str(tmp_path)
    assert c.sae.residual.d_in == 576 and c.trainer.max_steps == 7
    assert cfg.sae._target_ == "saelab.sae.SAE" and cfg.trainer.max_steps == 1200  # the original is untouched
    f = finetune_cfg(cfg, tmp_path, cfg.objective.terms, 5, 0.01)
    assert f.sae.init_from == str(tmp_path) and (f.trainer.max_steps, f.optim.optimizer.lr) == (5, 0.01)
    assert cfg.sae.init_from is None


def _with_threshold(boosted: ResidualSAE) -> ResidualSAE:
    boosted.train()(torch.randn(64, 16))  # one training forward sets the residual's BatchTopK threshold
    return boosted.eval()


def test_base_plus_both_is_the_sum_of_its_parts(tmp_path):
    torch.manual_seed(0)
    base = SAE(16, 64, BatchTopK(4), seed=1)
    with torch.no_grad():
        base.b_dec.normal_()  # a decoder bias and input centring that the stitched export must fold in
    base.train()(torch.randn(64, 16))
    base.eval()
    res_p, res_b = (
        SAE(16, 8, BatchTopK(2), apply_b_dec_to_input=False, b_dec_init="zeros", seed=s) for s in (2, 3)
    )
    stitched = save_sae(_with_threshold(ResidualSAE(base, res_p)), tmp_path / "base+p")
    _with_threshold(ResidualSAE(base, res_b))
    both = load_sae(boost.add_residual(stitched, res_b, tmp_path / "base+both"))

    x = torch.randn(200, 16) * 3
    want = base(x).x_hat + res_p(x).x_hat + res_b(x).x_hat
    assert both.d_sae == 64 + 8 + 8
    assert torch.allclose(both(x).x_hat, want, atol=1e-5)
    assert boost.composition_error(both, base, [res_p, res_b], x) < 1e-6
    # the stitched codes are the base's, then the physics residual's, then the biomedical residual's
    blocks = boost.boosted_blocks(64, {"p": 8, "b": 8}, "both")
    assert blocks == {
        "base+p": {"p": (64, 72)},
        "base+b": {"b": (64, 72)},
        "both": {"p": (64, 72), "b": (72, 80)},
    }
    codes = both(x).codes
    for part, (a, b) in zip((res_p, res_b), blocks["both"].values(), strict=True):
        assert torch.equal(codes[:, a:b] != 0, part(x).codes != 0)
    assert res_b.b_dec.abs().sum() == 0  # add_residual copied the residual; the original is unchanged


def test_fired_latents_counts_each_block():
    density = [0.5, 0.0, 0.1, 0.0, 0.0, 0.2, 1e-6]
    assert boost.fired_latents(density, {"a": (2, 4), "b": (4, 7)}) == {"a": 1, "b": 2}
    assert boost.fired_latents(torch.zeros(7), {"a": (0, 7)}) == {"a": 0}
    assert boost.fired_latents(density, {}) == {}


def test_head_takes_the_documents_a_token_budget_reads():
    from saelab.corpora.text import Corpus

    def words(text, add_special_tokens=False):  # a stand-in tokenizer: one token per word
        return {"input_ids": text.split()}

    c = Corpus("toy", ["a b c", "d e", "f g h i"], ["1", "2", "3"])
    # each document counts its tokens plus the separator that joins it to the next
    assert boost.head(c, words, 4).ids == ["1"] and boost.head(c, words, 5).ids == ["1", "2"]
    assert boost.head(c, words, 100).ids == ["1", "2", "3"]


def _per(metrics: dict, sae: str, source: str) -> dict:
    """The `<sae>/<source>/<metric>` entries of results.json `metrics`, by metric name."""
    head = f"{sae}/{source}/"
    return {k.removeprefix(head): v for k, v in metrics.items() if k.startswith(head)}


ROWS = ("base", "base+physics", "base+bio", "base+both", "finetune_physics", "scratch_wide")


@pytest.mark.slow  # the whole recipe through `python -m saelab` on the embedded SmolLM2 and MiniLM
def test_boost_tiny_end_to_end(tmp_path):
    run = tmp_path / "run"
    p = run_cli(
        "+experiment=boost_domain", f"data.cache_dir={tmp_path / 'cache'}", "+debug=tiny", run_dir=run
    )
    assert "Comparison" in p.stdout and "| base+both |" in p.stdout

    saved = json.loads((run / "results.json").read_text())
    m = saved["metrics"]
    for name in ROWS:
        for src in ("general", "physics", "bio"):
            r = _per(m, name, src)
            assert -1.0 < r["explained_variance"] <= 1.0 and r["l0"] > 0
            assert r["ce_loss_score"] == pytest.approx(
                (r["ce_zero"] - r["ce_sae"]) / (r["ce_zero"] - r["ce_clean"])
            )
        assert load_sae(saved["exports"][name]).d_sae == {"base+physics": 144, "base+bio": 144}.get(
            name, 160 if name in ("base+both", "scratch_wide") else 128
        )
    # the stitched rows count base and residual latents; the residual rows report the residual latents firing
    assert _per(m, "base+both", "bio")["l0"] > _per(m, "base", "bio")["l0"]
    assert 0 < m["base+both/bio/residual_fired"] <= 32 and 0 < m["base+bio/bio/residual_fired"] <= 16
    assert not any(k.startswith(("base/", "scratch_wide/")) and "residual_fired" in k for k in m)
    assert m["base+both/composition_rel_err"] < 1e-5
    assert saved["residual_blocks"]["base+both"] == {"physics": [128, 144], "bio": [144, 160]}
    # each stage's config: residuals on the frozen base export, the fine-tune from it, the wide SAE from scratch
    base = str(run / "base" / "sae")
    for stage in ("res_physics", "res_bio", "finetune_physics", "scratch_wide"):
        conf = torch.load(run / "checkpoints" / stage / "last.ckpt", weights_only=False)["saelab_config"]
        sae = conf["sae"]
        if stage.startswith("res_"):
            assert sae["_target_"] == "saelab.sae.ResidualSAE" and sae["base"]["path"] == base
            assert sae["residual"]["d_sae"] == 16 and conf["trainer"]["max_steps"] == 10
        elif stage == "finetune_physics":
            assert sae["init_from"] == base and conf["optim"]["optimizer"]["lr"] == 0.0003
        else:
            assert (sae["d_sae"], sae["activation"]["k"], sae["init_from"]) == (160, 40, None)
    parts = saved["scratch_corpus"]["concat"]
    assert [q["name"] for q in parts] == [
        "general_nobio/train",
        "dense:physics_seed/train->general_nobio/train",
        "pubmedqa/train",
    ]
    assert saved["selection"]["dense"]["n_docs"] == 16 and "bm25" not in saved["selection"]
    assert 2048 <= saved["stages"]["res_bio"]["train_tokens"] < 2048 + 127  # whole contexts of the budget
    report = (run / "report.md").read_text()
    for section in (
        "## Comparison",
        "## Residual latents that fire",
        "## Figures",
        "## Rows",
        "## Artifacts",
    ):
        assert section in report
    assert (run / "ev.png").stat().st_size > 0 and (run / "ce_loss_score.png").stat().st_size > 0
    assert "| (clean model) |" in report and saved["exports"]["base+both"] in report
