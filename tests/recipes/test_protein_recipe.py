"""End-to-end protein_esm2 recipe on a tiny random ESM-2 and a hand-written Swiss-Prot file."""

from __future__ import annotations

import json

from conftest import compose_cfg
from support import make_tiny_esm, swissprot_flatfile

from saelab.recipes.protein import run


def test_protein_recipe_end_to_end_tiny(tmp_path):
    model = make_tiny_esm(tmp_path / "esm")
    files = swissprot_flatfile(tmp_path / "entries.dat")
    cfg = compose_cfg(
        [
            "+experiment=protein_esm2",
            "data/host=esm2_8m",
            f"data.host.source={model}",
            "data.host.hook=1",
            "data.host.d_in=16",
            f"data.files=[{files}]",
            "data.annotations=[transmembrane,zinc_finger]",
            "data.min_subtype_residues=50",
            "data.cache=false",
            "data.batch_size=64",
            "data.val_fraction=0.25",
            "sae.d_sae=32",
            "sae.activation.k=4",
            "trainer.max_steps=30",
            "trainer.val_check_interval=15",
            "checkpoint.every_n_steps=15",
            "recipe.steering.n=4",
            "recipe.steering.length=30",
            "recipe.steering.rounds=3",
            "recipe.steering.strengths=[1.0]",
            "logger=csv",
            f"+run_dir={tmp_path / 'run'}",
        ]
    )
    res = run(cfg)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["data"]["sequences"] == 24 and saved["data"]["residues"] == res["data"]["residues"]
    assert set(saved["data"]["labels"]) == {
        "transmembrane",
        "zinc_finger",
        "transmembrane:Helical",
        "zinc_finger:C2H2-type",
    }
    m = saved["metrics"]
    assert 0.0 <= m["eval/recovery"] <= 1.0 and m["eval/kl"] >= 0.0
    assert m["eval/explained_variance"] <= 1.0 and m["eval/n_tokens"] > 0 and len(saved["density"]) == 32
    assert m["train/steps"] == 30
    enr = saved["enrichment"]["annotations"]["transmembrane"]
    assert enr["residues"] == 24 * 19 and set(enr["n_significant"]) == {"0.01", "0.1", "1"}
    assert m["eval/n_sig/transmembrane"] == enr["n_significant"]["0.1"]  # the headline τ
    for target in ("transmembrane", "zinc_finger"):
        st = saved["steering"][target]
        assert "steered" in st or "skipped" in st
        if "steered" in st:
            assert set(st["steered"]) == {"1"} and st["steered"]["1"]["n"] == 4
            assert m[f"steering/{target}/success_rate/c=1"] == st["steered"]["1"]["success_rate"]
    assert saved["host"]["act_scale"] == res["host"]["act_scale"] > 0
    for f in ("report.md", "density.png", "enrichment_heatmap.png", "sae/cfg.json"):
        assert (out / f).exists(), f
    report = (out / "report.md").read_text()
    assert "Annotation enrichment" in report and "Fidelity" in report and "Steering" in report
