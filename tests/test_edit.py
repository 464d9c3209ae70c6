"""The latent edit: each mode against decode(f') + SAE error computed by hand, positions, pooling, bad input."""

from __future__ import annotations

import pytest
import torch

from saelab.edit import LatentEdit
from saelab.sae import SAE, TopK


def _sae() -> SAE:
    sae = SAE(16, 32, TopK(6), seed=0).eval()
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def _reference(sae, h, latents, new_codes, s):
    """decode(f') + (s·h − decode(f)), unscaled: the edit with the SAE's error kept, by hand."""
    x = h.reshape(-1, h.shape[-1]) * s
    f = sae.encode(x)
    f2 = f.clone()
    f2[:, latents] = new_codes(f[:, latents])
    return ((sae.decode(f2) + (x - sae.decode(f))) / s).reshape(h.shape)


@pytest.mark.parametrize(
    "mode, value, by_hand",
    [
        ("zero", None, lambda f: torch.zeros_like(f)),
        ("clamp", [3.0, 0.0, 1.0], lambda f: torch.maximum(f, torch.tensor([3.0, 0.0, 1.0]))),
        ("set", 2.5, lambda f: torch.full_like(f, 2.5)),
        ("scale", 4.0, lambda f: 4.0 * f),
    ],
)
def test_each_mode_equals_decode_with_error_kept(mode, value, by_hand):
    sae = _sae()
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    latents = [1, 2, 9]
    out = LatentEdit(sae, latents, mode, value, scale=0.5)(h)
    ref = _reference(sae, h, latents, by_hand, 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, h)  # the chosen latents fire on these rows: the edit is live


def test_edits_that_change_nothing_are_the_identity():
    sae = _sae()
    h = torch.randn(3, 16)
    assert LatentEdit(sae, [])(h) is h
    torch.testing.assert_close(LatentEdit(sae, [0, 4], "clamp", 0.0)(h), h, atol=0, rtol=0)
    torch.testing.assert_close(LatentEdit(sae, [0, 4], "scale", 1.0)(h), h, atol=0, rtol=0)


def test_positions_limit_the_edit():
    sae = _sae()
    h = torch.randn(2, 4, 16)
    edit = LatentEdit(sae, list(range(32)), "zero")
    edit.positions = torch.tensor([[True, False, False, True], [False, False, True, False]])
    out = edit(h)
    full = LatentEdit(sae, list(range(32)), "zero")(h)
    torch.testing.assert_close(out[edit.positions], full[edit.positions])
    torch.testing.assert_close(out[~edit.positions], h[~edit.positions], atol=0, rtol=0)


def test_zero_edit_commutes_with_mean_pooling():
    """SHIFT ablates pooled codes: mean_t(h + Δ(h_t)) = mean_t(h) + Δ_codes(mean_t f)."""
    sae = _sae()
    h = torch.randn(7, 16)
    edit = LatentEdit(sae, [3, 5, 11], "zero", scale=2.0)
    pooled_after = edit(h).mean(0)
    codes = sae.encode(h * 2.0).mean(0, keepdim=True)
    torch.testing.assert_close(
        pooled_after, h.mean(0) + edit.delta_from_codes(codes)[0], atol=1e-5, rtol=1e-5
    )


def test_bad_input_says_what_to_do():
    sae = _sae()
    with pytest.raises(ValueError, match="mode must be one of zero, clamp, set, scale"):
        LatentEdit(sae, [0], "boost", 1.0)
    with pytest.raises(ValueError, match="needs a value"):
        LatentEdit(sae, [0], "clamp")
    with pytest.raises(ValueError, match=r"latents \[32\] are out of range 0..31"):
        LatentEdit(sae, [0, 32])
    with pytest.raises(ValueError, match="2 latents but 3 edit values"):
        LatentEdit(sae, [0, 1], "set", [1.0, 2.0, 3.0])
