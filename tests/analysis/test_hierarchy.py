"""Nested-dictionary views and parent/child latents on hand-built codes with a known answer."""

from __future__ import annotations

import pytest
import torch

from saelab.analysis.hierarchy import children, sample_parents, top_tokens
from saelab.eval.base import prefix
from saelab.recipes.matryoshka import prefix_sizes
from saelab.sae import SAE, BatchTopK, JumpReLU, TopK


def _trained_batchtopk(d_in=8, d_sae=12, k=3):
    sae = SAE(d_in, d_sae, BatchTopK(k), seed=1)
    sae.activation.threshold.fill_(0.05)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(0))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
    return sae.eval()


def test_prefix_is_the_matryoshka_reconstruction():
    """For a threshold activation, prefix m reconstructs with exactly the first m codes of the full SAE."""
    sae = _trained_batchtopk()
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    full = sae(x).codes
    for m in (1, 5, 12):
        view = prefix(sae, m)
        assert view.d_sae == m and view.W_dec.shape == (m, 8)
        expected = full[:, :m] @ sae.W_dec[:m] + sae.b_dec  # x̂_m = f(x)_{0:m} W_dec[0:m] + b_dec
        out = view(x)
        assert torch.allclose(out.codes, full[:, :m])
        assert torch.allclose(out.x_hat, expected, atol=1e-6)
    assert sae.d_sae == 12 and sae.W_dec.requires_grad  # the original is untouched


def test_prefix_slices_per_latent_thresholds_and_rejects_bad_sizes():
    sae = SAE(4, 6, JumpReLU(6, threshold_init=0.2), seed=0)
    with torch.no_grad():
        sae.activation.log_threshold.copy_(torch.log(torch.arange(1, 7) / 10.0))
    view = prefix(sae, 3)
    assert torch.allclose(view.activation.threshold, torch.tensor([0.1, 0.2, 0.3]))
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(view(x).codes, sae(x).codes[:, :3])
    with pytest.raises(ValueError, match="prefix size"):
        prefix(sae, 7)
    assert prefix(SAE(4, 6, TopK(2)), 4).activation.k == 2


def test_prefix_sizes_from_group_fractions():
    assert prefix_sizes(2048, [0.0625, 0.0625, 0.125, 0.25, 0.5]) == [128, 256, 512, 1024, 2048]
    assert prefix_sizes(10, [0.5, 0.5]) == [5, 10]


def test_children_by_cosine_and_cofiring():
    """Latent 0 (parent) fires on rows 0-5; latent 3 fires on rows 0-2 (always with the parent) and points
    near the parent; latent 4 points nearer but fires without the parent; latent 5 co-fires but is far."""
    codes = torch.zeros(10, 6)
    codes[0:6, 0] = 1.0
    codes[0:3, 3] = 2.0
    codes[6:10, 4] = 1.0  # never with the parent: P(parent | 4) = 0
    codes[3:6, 5] = 1.0  # always with the parent
    W = torch.zeros(6, 3)
    W[0] = torch.tensor([1.0, 0, 0])
    W[1], W[2] = torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    W[3] = torch.tensor([0.8, 0.6, 0])  # cos 0.8 with the parent
    W[4] = torch.tensor([0.95, 0.0, 0.3122])  # cos ≈ 0.95, but no co-firing
    W[5] = torch.tensor([0.1, 0.0, 0.995])  # cos ≈ 0.1
    [res] = children(codes, W, [0], range(1, 6), n_children=2, min_cofire=0.5, min_count=3)
    assert res["parent"] == 0 and res["fires"] == 6
    assert [c["latent"] for c in res["children"]] == [3, 5]
    assert res["children"][0]["cos"] == pytest.approx(0.8, abs=1e-5)
    assert res["children"][0]["cofire"] == pytest.approx(1.0)
    ids = torch.tensor([7, 7, 8, 9, 9, 9, 1, 1, 1, 1])
    codes[1, 3] = 3.0
    assert top_tokens(codes, ids, 3, lambda t: f"t{t}") == ["t7", "t8"]
    assert sample_parents(codes, 3, 5, min_count=5) == [0]  # only latent 0 of the first 3 fires ≥ 5 times
