"""Decoder-geometry evaluators on hand-built dictionaries whose answers are known."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra.utils import instantiate

from saelab.eval.base import evaluate
from saelab.eval.geometry import (
    Composition,
    Geometry,
    UniqueFeatures,
    clustering_coefficients,
    count_triangles,
    decoder_graphs,
    max_cos_overlay,
    threshold_key,
    unique_features,
)
from saelab.io import save_sae
from saelab.lit import LitSAE
from saelab.sae import SAE, BatchTopK, ReLU


def sae_with(W: torch.Tensor) -> SAE:
    sae = SAE(W.shape[1], W.shape[0], ReLU(), b_dec_init="zeros")
    with torch.no_grad():
        sae.W_dec.copy_(W)
    return sae.eval()


def orthogonal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n orthonormal rows in d dimensions."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q[:n]


def decoder_of_graph(n: int, edges: list[tuple[int, int]], c: float = 0.4) -> torch.Tensor:
    """Unit rows with cos = c on `edges` and 0 elsewhere: a Cholesky factor of I + c·A."""
    G = torch.eye(n, dtype=torch.float64)
    for i, j in edges:
        G[i, j] = G[j, i] = c
    return torch.linalg.cholesky(G).float()


def brute_force(W: torch.Tensor, tau: float) -> dict:
    Wn = W.double() / W.double().norm(dim=1, keepdim=True)
    C = Wn @ Wn.t()
    n = W.shape[0]
    adj = [[i != j and float(C[i, j]) > tau for j in range(n)] for i in range(n)]
    tri = sum(adj[a][b] and adj[b][c] and adj[a][c] for a, b, c in itertools.combinations(range(n), 3))
    deg = [sum(row) for row in adj]
    triples = sum(d * (d - 1) // 2 for d in deg)
    return {
        "edges": sum(deg) // 2,
        "triangles": tri,
        "triples": triples,
        "coefficient": 3 * tri / triples if triples else 0.0,
    }


# ------------------------------------------------------------------------------------------------ geometry
def test_orthogonal_decoder_has_zero_mean_cos_and_no_edges(tmp_path):
    res = Geometry(thresholds=[0.1, 0.5])(sae_with(orthogonal(16, 16)), None, tmp_path)
    assert res.metrics["mean_max_cos"] == pytest.approx(0.0, abs=1e-6)
    assert res.metrics["clustering_t0p1"] == 0.0 and res.metrics["clustering_t0p5"] == 0.0
    assert [r["edges"] for r in res.data["clustering"]] == [0, 0]
    assert sum(res.data["max_cos_hist"]["counts"]) == 16 and len(res.data["max_cos"]) == 16
    assert (tmp_path / "decoder_cos.png").exists()


def test_triangle_plus_pendant_has_transitivity_three_fifths(tmp_path):
    # triangle 0-1-2 and vertex 3 hanging on 0: degrees 3, 2, 2, 1 → 3 + 1 + 1 + 0 = 5 triples, 1 triangle
    W = decoder_of_graph(4, [(0, 1), (1, 2), (0, 2), (0, 3)])
    res = Geometry(thresholds=[0.3, 0.5], plot=False)(sae_with(W), None, tmp_path)
    rec = res.data["clustering"][0]
    assert (rec["edges"], rec["triangles"], rec["triples"]) == (4, 1, 5)
    assert res.metrics["clustering_t0p3"] == pytest.approx(3 / 5)
    assert res.metrics["clustering_t0p5"] == 0.0  # every cos is 0.4: no edge above 0.5
    assert rec == pytest.approx({"threshold": 0.3, **brute_force(W, 0.3)})


def test_star_has_transitivity_zero():
    W = decoder_of_graph(5, [(0, leaf) for leaf in range(1, 5)])
    (rec,) = clustering_coefficients(W, [0.3])
    assert (rec["edges"], rec["triangles"], rec["triples"], rec["coefficient"]) == (4, 0, 6, 0.0)
    assert rec == pytest.approx({"threshold": 0.3, **brute_force(W, 0.3)})


@pytest.mark.parametrize("method", ["sparse", "dense", "auto"])
def test_blockwise_clustering_equals_brute_force(method):
    W = torch.randn(40, 5, generator=torch.Generator().manual_seed(3))
    taus = [0.0, 0.3, 0.6, 0.9]
    got = clustering_coefficients(W, taus, method=method, block_rows=7)  # 6 blocks, the last one short
    for tau, rec in zip(taus, got):
        assert rec == pytest.approx({"threshold": tau, **brute_force(W, tau)})
    assert got[0]["triangles"] > 0  # a graph with triangles, so the counts are tested


def test_one_gram_pass_gives_max_cos_and_upper_triangle_edges():
    W = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    max_cos, ((i, j),) = decoder_graphs(W, [0.5], block_rows=8)
    Wn = W / W.norm(dim=1, keepdim=True)
    C = Wn @ Wn.t() - 3 * torch.eye(30)
    assert max_cos.tolist() == pytest.approx(C.max(1).values.tolist(), abs=1e-6)
    expected = {(a, b) for a in range(30) for b in range(a + 1, 30) if C[a, b] > 0.5}
    assert set(zip(i.tolist(), j.tolist())) == expected


def test_count_triangles_of_a_complete_graph():
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6)]
    i = torch.tensor([a for a, _ in pairs]).numpy()
    j = torch.tensor([b for _, b in pairs]).numpy()
    assert count_triangles(i, j, 6, "sparse") == count_triangles(i, j, 6, "dense") == 20  # C(6, 3)


def test_threshold_keys_are_wandb_safe():
    assert [threshold_key(t) for t in (0.3, 0.95, 0.125)] == [
        "clustering_t0p3",
        "clustering_t0p95",
        "clustering_t0p125",
    ]


def test_overlay_of_several_saes(tmp_path):
    res = {
        name: Geometry(thresholds=[0.5], plot=False)(sae_with(torch.randn(32, 8)), None, tmp_path)
        for name in ("a", "b")
    }
    assert max_cos_overlay(res, tmp_path / "overlay.png").exists()


# --------------------------------------------------------------------------------------------- composition
def atoms_decoder(m: int, d: int, n_atoms: int, k: int = 4, seed: int = 0) -> torch.Tensor:
    """Rows that are normalised non-negative combinations of 1..k of n_atoms unit atoms."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    W = torch.zeros(m, d)
    for r in range(m):
        n = int(torch.randint(1, k + 1, (1,), generator=g))
        idx = torch.randperm(n_atoms, generator=g)[:n]
        W[r] = ((torch.rand(n, generator=g) + 0.2)[:, None] * atoms[idx]).sum(0)
    return W / W.norm(dim=1, keepdim=True)


def test_a_dictionary_of_few_atoms_composes_and_an_orthogonal_one_does_not(tmp_path):
    comp = Composition(lit=LitSAE, seed=0)
    rng = torch.random.get_rng_state()
    composed = comp(sae_with(atoms_decoder(128, 32, n_atoms=8)), None, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's RNG stream is untouched
    atomic = comp(sae_with(orthogonal(64, 64)), None, tmp_path)
    assert composed.metrics["composition"] > 0.9
    assert atomic.metrics["composition"] < 0.3  # 16 meta latents span at most 16 of 64 orthogonal rows
    assert 0 < composed.metrics["meta_l0"] <= 4 + 1e-6 and 0 <= composed.metrics["meta_dead_frac"] < 1
    assert composed.data["composition"]["width"] == 32 and isinstance(composed.objects["meta_sae"], SAE)
    assert isinstance(composed.objects["meta_sae"].activation, BatchTopK)
    assert not list(tmp_path.glob("lightning_logs")) and not list(tmp_path.rglob("*.ckpt"))
    again = comp(sae_with(atoms_decoder(128, 32, n_atoms=8)), None, tmp_path)
    assert again.metrics == composed.metrics  # seeded and deterministic


def test_composition_config_binds_the_trainer_module(cfg_factory):
    cfg = cfg_factory(["eval/metrics=[composition,unique_features]"])
    comp = instantiate(cfg.eval.metrics.composition)
    assert isinstance(comp, Composition) and comp.lit.func is LitSAE
    assert isinstance(instantiate(cfg.eval.metrics.unique_features), UniqueFeatures)


# ----------------------------------------------------------------------------------------- unique features
def test_identical_dictionaries_share_every_feature():
    W = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    r = unique_features(W, W.clone() * 3.0, block_rows=6)
    assert (r["unique_a"], r["unique_b"], r["n_unique_a"], r["n_unique_b"]) == (0.0, 0.0, 0, 0)


def test_negated_and_disjoint_orthogonal_dictionaries_are_all_unique():
    Q = orthogonal(8, 8)
    neg = unique_features(Q, -Q)  # signed cosines: −d_i is no counterpart of d_i
    assert (neg["unique_a"], neg["unique_b"]) == (1.0, 1.0)
    disjoint = unique_features(Q[:3], Q[3:])
    assert (disjoint["n_unique_a"], disjoint["n_unique_b"], disjoint["unique_a"], disjoint["unique_b"]) == (
        3,
        5,
        1.0,
        1.0,
    )


def test_unique_features_counts_each_direction():
    # A = {e0, e1, e2}, B = {e0, (e1 + e3)/√2, e3}: e1 and (e1 + e3)/√2 have cos 0.707, so only e2 of A
    # and only e3 of B have no counterpart
    A = torch.eye(4)[:3]
    B = torch.stack([torch.eye(4)[0], (torch.eye(4)[1] + torch.eye(4)[3]) / 2**0.5, torch.eye(4)[3]])
    r = unique_features(A, B)
    assert (r["n_unique_a"], r["n_unique_b"]) == (1, 1)
    assert r["max_cos_a"].tolist() == pytest.approx([1.0, 2**-0.5, 0.0], abs=1e-6)


def test_unique_features_evaluator_reads_exports_and_modules(tmp_path):
    Q = orthogonal(8, 8)
    export = save_sae(sae_with(Q[:4]), tmp_path / "other")
    ev = UniqueFeatures(against={"same": sae_with(Q[:4]), "other-run": str(export), "disjoint": Q[4:]})
    res = evaluate(sae_with(Q[:4]), None, [ev], tmp_path)
    assert res.metrics == {
        "unique_vs_same": 0.0,
        "unique_of_same": 0.0,
        "unique_vs_other_run": 0.0,
        "unique_of_other_run": 0.0,
        "unique_vs_disjoint": 1.0,
        "unique_of_disjoint": 1.0,
    }
    assert res.data["unique_features"]["disjoint"]["n_unique_b"] == 4
    assert len(res.tables["unique features"].rows) == 3


def test_unique_features_of_different_sites_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"d_in=8.*d_in=6.*same activation site"):
        UniqueFeatures(against={"other": sae_with(torch.randn(5, 6))})(
            sae_with(torch.randn(5, 8)), None, tmp_path
        )
    with pytest.raises(ValueError, match=r"d_in=8.*d_in=6.*same activation site"):
        unique_features(torch.randn(5, 8), torch.randn(5, 6))
