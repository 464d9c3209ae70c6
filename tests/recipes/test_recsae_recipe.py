"""`+experiment=recsae_sasrec` end to end on a tiny RecBole-format dataset, and the SASRec cache on rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from support import write_movielens

from saelab.corpora.movielens import load_interactions
from saelab.data.recsae import RecSAEDataModule, history_windows, shuffle_windows


def tiny_cfg(tmp_path: Path, run_dir: Path, extra=()):
    return compose_cfg(
        [
            "+experiment=recsae_sasrec",
            "logger=none",
            f"+run_dir={run_dir}",
            f"data.corpus.data_dir={tmp_path}",
            "data.corpus.dataset=tiny",
            "data.corpus.min_word_items=100",
            "data.d_in=16",
            "data.host.max_len=6",
            "data.batch_size=64",
            "data.n_analysis=200",
            "sae.d_sae=32",
            "sae.activation.k=4",
            "objective.terms.auxk.k_aux=8",
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "recipe.sasrec_fit.max_epochs=2",
            "recipe.sasrec_fit.batch_size=32",
            "recipe.concepts.min_active=3",
            "recipe.ablation.n_latents=2",
            "recipe.ablation.n_users=100",
            *extra,
        ],
    )


def test_shuffled_windows_keep_items_and_padding():
    wins, users, pos = history_windows([[1, 2, 3], [4, 5]], max_len=2)
    assert wins.tolist() == [[0, 1], [1, 2], [2, 3], [0, 4], [4, 5]]
    assert users.tolist() == [0, 0, 0, 1, 1] and pos.tolist() == [0, 1, 2, 0, 1]
    big = torch.randint(1, 50, (200, 6)) * (torch.rand(200, 6) > 0.3)
    big = big.sort(dim=1).values  # padding (0) on the left, as pad_left makes it
    sh = shuffle_windows(big, torch.Generator().manual_seed(0))
    assert torch.equal(sh.sort(dim=1).values, big)
    assert torch.equal(sh == 0, big == 0)
    assert not torch.equal(sh, big)


def test_datamodule_needs_a_trained_host(tmp_path):
    write_movielens(tmp_path)
    corpus = load_interactions(str(tmp_path), "tiny")
    with pytest.raises(ValueError, match="recsae recipe"):
        RecSAEDataModule(d_in=16, host=None, corpus=corpus)


def test_recsae_recipe_end_to_end_and_host_cache(tmp_path):
    from saelab.recipes import recsae

    write_movielens(tmp_path)
    run_dir = tmp_path / "run"
    results = recsae.run(tiny_cfg(tmp_path, run_dir))
    m = results["metrics"]
    for k in (5, 10, 20):  # the ranking evaluator: host alone (clean/) and with the reconstruction (sae/)
        assert 0 <= m[f"eval/clean/ndcg@{k}"] <= m[f"eval/clean/hr@{k}"] <= 1
        assert 0 <= m[f"eval/sae/ndcg@{k}"] <= m[f"eval/sae/hr@{k}"] <= 1
    assert m["eval/clean/hr@5"] <= m["eval/clean/hr@10"] <= m["eval/clean/hr@20"]
    assert m["eval/l0"] == pytest.approx(4.0)
    assert m["train/steps"] == 20
    assert m["concepts/n_alive_latents"] >= m["concepts/n_with_concepts"]
    assert m["concepts/n_confident"] <= m["concepts/n_with_concepts"] <= 32
    assert len(results["latents"]) == m["concepts/n_with_concepts"]
    assert all(a["mode"] in ("zero", "boost") and 0 <= a["p_value"] <= 1 for a in results["ablations"])
    flags = [r["confident"] for r in results["latents"]]
    assert flags == sorted(flags, reverse=True)  # confident latents first
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["metrics"]["eval/clean/hr@10"] == pytest.approx(m["eval/clean/hr@10"])
    assert set(on_disk) >= {"name", "metrics", "latents", "ablations", "export"}
    report = (run_dir / "report.md").read_text()
    for heading in ("Fidelity (leave-one-out test, full ranking)", "Most confident concept latents",
                    "Latent ablation", "Metrics", "Figures", "Artifacts"):  # fmt: skip
        assert f"## {heading}" in report, heading
    assert "fidelity.png" in report and "density.png" in report
    for f in ("host/sasrec.pt", "sae/cfg.json", "sae/sae_weights.safetensors", "fidelity.png", "density.png"):
        assert (run_dir / f).exists(), f
    assert m["sasrec/seconds"] > 0

    # a rerun in the same run dir reuses the cached SASRec: same host metrics, no host training
    again = recsae.run(tiny_cfg(tmp_path, run_dir, ["resume=auto"]))["metrics"]
    assert again["sasrec/seconds"] == 0.0
    assert again["sasrec/cached"] is True
    assert again["eval/clean/hr@10"] == m["eval/clean/hr@10"]
    assert again["eval/clean/ndcg@10"] == m["eval/clean/ndcg@10"]
