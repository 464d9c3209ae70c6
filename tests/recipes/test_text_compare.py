"""`ortsae_text` and `matryoshka_text` end to end through the CLI on a tiny random Llama host (real corpora,
the SmolLM2 tokenizer, every evaluator of the experiments)."""

from __future__ import annotations

import json

import pytest
from support import run_cli, save_tiny_causal_lm

from saelab.io import load_sae

pytestmark = pytest.mark.slow  # several fits, spliced and absorption evaluations per test


def _tiny(tmp_path) -> list[str]:
    host = save_tiny_causal_lm(tmp_path / "tiny", "llama", n_layers=3, hidden=32)
    return [
        f"data.host.model={host}",
        "data.host.hook=1",
        "data.host.d_in=32",
        f"data.cache_dir={tmp_path / 'cache'}",
        "+debug=tiny",
        "sae.d_sae=64",
    ]


def test_ortsae_text_tiny(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("+experiment=ortsae_text", *_tiny(tmp_path), run_dir=run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    rows = res["variants"]
    stages = {f"{v}_{c}" for v in ("batchtopk", "ortsae", "matryoshka") for c in ("k16", "k32")}
    assert set(rows) == stages
    for name, r in rows.items():
        assert 0 <= r["mean_max_cos"] <= 1 and 0 <= r["absorption"] <= 1 and r["composition"] <= 1
        assert r["l0"] > 0 and -1 < r["physics/explained_variance"] <= 1
        want = (r["ce_zero"] - r["ce_sae"]) / (r["ce_zero"] - r["ce_clean"])
        assert r["ce_loss_score"] == pytest.approx(want)
        assert "pubmedqa/ce_loss_score" in r
        others = {"batchtopk", "ortsae", "matryoshka"} - {name.split("_")[0]}
        assert {f"unique_vs_{o}" for o in others} <= set(r)
        assert all(0 <= r[f"unique_vs_{o}"] <= 1 for o in others)
        assert load_sae(run_dir / name / "sae").d_sae == 64
    assert rows["batchtopk_k16"]["step_time_x"] == 1.0
    # the same clean model on the same text for every SAE: one reference
    assert len({r["ce_clean"] for r in rows.values()}) == 1
    for png in ("compare.png", "mean_max_cos_vs_l0.png", "absorption_vs_l0.png", "decoder_cos.png"):
        assert (run_dir / png).exists(), png
    assert "| SAE |" in (run_dir / "report.md").read_text()


def test_matryoshka_text_tiny(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("+experiment=matryoshka_text", *_tiny(tmp_path), run_dir=run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["variants"]) == {"batchtopk", "matryoshka_fixed", "matryoshka_pareto"}
    per = res["per_prefix"]
    for name, by_m in per.items():
        assert list(by_m) == ["4", "8", "16", "32", "64"]  # JSON keys: 1/16 ... 1 of d_sae = 64
        assert by_m["64"]["explained_variance"] == pytest.approx(res["variants"][name]["explained_variance"])
        assert all(0 <= v["absorption"] <= 1 for v in by_m.values())
    h = res["hierarchy"]
    assert set(h) == {"matryoshka_fixed", "matryoshka_pareto"}
    for entries in h.values():
        for e in entries:
            assert e["parent"] < 4 and all(c["latent"] >= 4 for c in e["children"])
            assert all(c["cofire"] >= 0.3 for c in e["children"])
    assert (run_dir / "prefix_explained_variance.png").exists()


def test_matryoshka_autointerp_tiny(tmp_path):
    """Step 4 of the matryoshka recipe: records, autointerp per group (the embedded SmolLM2 explains the
    tiny host's latents), steering, the browser and the contexts table, for both variants."""
    run_dir = tmp_path / "run"
    # k 4 of 64 and short windows: latents with quiet windows, so every group has one to explain
    tiny = [*_tiny(tmp_path), "sae.activation.k=4", "recipe.interpret.autointerp.window=[4,1]"]
    run_cli("+experiment=matryoshka_autointerp", *tiny, run_dir=run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    found = res["interpret"]
    assert set(found) == {"batchtopk", "matryoshka_fixed"}
    md = (run_dir / "report.md").read_text()
    for name, got in found.items():
        chosen = [j for g in got["chosen"].values() for j in g]
        assert chosen and all(0 <= j < 64 for j in chosen)
        explained = [json.loads(ln) for ln in (run_dir / name / "autointerp" / "explanations.jsonl").open()]
        assert {r["latent"] for r in explained} == set(chosen) and len(got["chosen"]) == 5
        assert all(0.0 <= r["embedding"] <= 1.0 for r in explained if r["embedding"] is not None)
        assert (run_dir / name / "browser" / "index.html").is_file()
        assert (run_dir / name / "features" / "lens.json").is_file()
        assert f"## Top contexts: {name}" in md and f"## Auto-interpretation by group: {name}" in md
        if got["steering"]["latents"]:
            assert got["steering"]["rows"]
