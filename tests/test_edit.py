"""The latent edit: each mode against decode(f') + SAE error computed by hand, positions, pooling, bad input."""

from __future__ import annotations

import pytest
import torch

from saelab.edit import LatentEdit
from saelab.sae import SAE, TopK


def _sae() -> SAE:
    sae = SAE(16, 32, TopK(6), seed=0).eval()
    with torch.no_grad():
        sae.b_dec.normal_(
            generator=torch.Generator().manual_seed(0)
        )  # seeded: the same latents fire every run
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
    with torch.no_grad():  # three latents that fire on these rows, so the edit below is live
        fired = (sae.encode(0.5 * h.reshape(-1, 16)) > 0).sum(0)
    latents = fired.argsort(descending=True)[:3].tolist()
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


def test_add_mode_adds_alpha_decoder_rows_everywhere():
    """h' = h + Σ α_j W_dec[j] / s; the same as raising the codes by α with the SAE's error kept."""
    sae = _sae()
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    latents, alpha = [1, 2, 9], [3.0, -1.0, 0.5]
    edit = LatentEdit(sae, latents, "add", alpha, scale=0.5)
    out = edit(h)
    by_hand = h + (torch.tensor(alpha) @ sae.W_dec[latents].detach()) / 0.5
    torch.testing.assert_close(out, by_hand, atol=1e-6, rtol=1e-6)
    ref = _reference(sae, h, latents, lambda f: f + torch.tensor(alpha), 0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    codes = sae.encode(h.reshape(-1, 16) * 0.5)  # the change does not depend on the codes
    torch.testing.assert_close(
        edit.delta_from_codes(codes), (by_hand - h).reshape(-1, 16), atol=1e-6, rtol=1e-6
    )


def test_add_zero_is_the_identity_exactly():
    sae = _sae()
    h = torch.randn(3, 4, 16)
    torch.testing.assert_close(LatentEdit(sae, [0, 4, 31], "add", 0.0, scale=3.0)(h), h, atol=0, rtol=0)
    half = torch.randn(3, 4, 16).to(torch.bfloat16)  # cast back to the hook's dtype: still exact
    torch.testing.assert_close(LatentEdit(sae, [7], "add", 0.0)(half), half, atol=0, rtol=0)


def test_add_mode_respects_positions():
    sae = _sae()
    h = torch.randn(2, 4, 16)
    edit = LatentEdit(sae, [5], "add", 2.0)
    edit.positions = torch.tensor([[True, False, False, True], [False, True, False, False]])
    out = edit(h)
    torch.testing.assert_close(out[edit.positions], h[edit.positions] + 2.0 * sae.W_dec[5].detach())
    torch.testing.assert_close(out[~edit.positions], h[~edit.positions], atol=0, rtol=0)
    with pytest.raises(ValueError, match="add: the amount"):
        LatentEdit(sae, [0], "add")
