"""The evaluator interface and the generic evaluators, against values computed here by hand."""

from __future__ import annotations

import pytest
import torch

from saelab.eval.base import EvalResult, Rescaled, Table, at_k, evaluate, in_host_units
from saelab.eval.core import Core
from saelab.eval.geometry import Geometry
from saelab.eval.synthetic import Recovery, recovery_figure
from saelab.sae import SAE, ReLU, TopK


class Source:
    """A minimal activation source: fixed validation batches (and optional extras)."""

    def __init__(self, batches, **extra):
        self.batches = batches
        for k, v in extra.items():
            setattr(self, k, v)

    def val_dataloader(self):
        return [{"acts": b} for b in self.batches]


def relu_sae(d_in=4, d_sae=6, seed=0):
    return SAE(d_in, d_sae, ReLU(), b_dec_init="zeros", seed=seed).eval()


def test_core_matches_hand_computation(tmp_path):
    sae = relu_sae()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)]
    res = Core(plot=False)(sae, Source(batches), tmp_path)
    x = torch.cat(batches).double()
    with torch.no_grad():
        out = sae(x.float())
    f, x_hat = out.codes.double(), out.x_hat.double()
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert res.metrics["n_tokens"] == 8
    assert res.metrics["l0"] == pytest.approx(float((f != 0).sum(1).double().mean()))
    assert res.metrics["fvu"] == pytest.approx(float(fvu), rel=1e-5)
    assert res.metrics["explained_variance"] == pytest.approx(1 - float(fvu), rel=1e-5)
    assert res.metrics["dead_frac"] == pytest.approx(float(((f != 0).sum(0) == 0).double().mean()))
    assert res.data["density"] == pytest.approx(((f != 0).sum(0).double() / 8).tolist())


def test_core_reads_only_n_batches_and_plots(tmp_path):
    sae = relu_sae()
    batches = [torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4)]
    res = Core(n_batches=2)(sae, Source(batches), tmp_path)
    assert res.metrics["n_tokens"] == 8
    assert res.figures["latent density"] == tmp_path / "density.png" and (tmp_path / "density.png").exists()


def test_core_on_empty_source_says_so(tmp_path):
    with pytest.raises(ValueError, match="validation split is empty"):
        Core(plot=False)(relu_sae(), Source([]), tmp_path)


def test_geometry_is_mean_max_cosine_of_decoder_rows(tmp_path):
    sae = relu_sae(d_in=2, d_sae=3)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # max cosines: row 0 ↔ row 2 = 1/√2, row 1 ↔ row 2 = 1/√2, row 2 ↔ either = 1/√2
    res = Geometry()(sae, Source([]), tmp_path)
    assert res.metrics["mean_max_cos"] == pytest.approx(2**-0.5, rel=1e-6)


def test_recovery_counts_true_features_matched(tmp_path):
    sae = relu_sae(d_in=3, d_sae=2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]))
    truth = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    res = Recovery(threshold=0.7, plot=False)(sae, Source([], true_features=truth), tmp_path)
    assert res.metrics["feature_recovery"] == pytest.approx((1.0 + 0.6 + 0.8) / 3, rel=1e-6)
    assert res.metrics["frac_recovered"] == pytest.approx(2 / 3)  # cos 1.0 and 0.8 pass, 0.6 does not


def test_recovery_plot_marks_the_threshold(tmp_path):
    (ax,) = recovery_figure([1.0, 0.6, 0.8], threshold=0.7).axes
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.7, 0.7] and line.get_label() == "threshold 0.7: 67% recovered"
    assert ax.get_xlabel() and ax.get_ylabel() == "count" and ax.get_title()
    (ax,) = recovery_figure([0.95, 0.97], threshold=0.9).axes  # a threshold left of every score
    assert ax.get_xlim()[0] < 0.9 < ax.get_xlim()[1]
    sae = relu_sae(d_in=3, d_sae=2)
    truth = torch.eye(3)
    res = Recovery()(sae, Source([], true_features=truth), tmp_path)
    assert res.figures["feature recovery"] == tmp_path / "recovery.png"
    assert (tmp_path / "recovery.png").exists()


def test_evaluate_skips_what_the_source_cannot_give_and_restores_mode(tmp_path, capsys):
    sae = relu_sae().train()
    res = evaluate(sae, Source([torch.randn(4, 4)]), [Core(plot=False), Recovery()], tmp_path)
    assert "l0" in res.metrics and "feature_recovery" not in res.metrics
    assert "skipped evaluator recovery" in capsys.readouterr().out
    assert sae.training


def test_merge_refuses_a_metric_reported_twice():
    a, b = EvalResult(metrics={"l0": 1.0}), EvalResult(metrics={"l0": 2.0})
    with pytest.raises(ValueError, match="both report metrics"):
        a.merge(b)
    assert a.merge(EvalResult(tables={"t": Table(["x"], [[1]])})).tables["t"].rows == [[1]]


def test_at_k_is_a_view_with_another_k():
    sae = SAE(8, 16, TopK(4), b_dec_init="zeros", seed=3).eval()
    x = torch.randn(5, 8)
    ref = SAE(8, 16, TopK(2), b_dec_init="zeros", seed=3).eval()  # same init seed → same weights
    view = at_k(sae, 2)
    with torch.no_grad():
        assert torch.equal(view(x).x_hat, ref(x).x_hat)
        assert view(x).l0.max() == 2 and sae(x).l0.max() == 4
    assert sae.activation.k == 4 and view.W_enc is sae.W_enc  # the original is untouched, weights shared
    with pytest.raises(ValueError, match="no TopK-style activation"):
        at_k(relu_sae(), 2)


def test_rescaled_presents_the_sae_in_host_units():
    sae = relu_sae()
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = Rescaled(sae, 2.5)(x)
        assert torch.allclose(out.x_hat, sae(2.5 * x).x_hat / 2.5)
    assert in_host_units(sae, Source([], act_scale=1.0)) is sae
    assert isinstance(in_host_units(sae, Source([], act_scale=3.0)), Rescaled)


class _TrainSource(Source):
    """Validation batches plus an endless training stream (as the datamodules have)."""

    def __init__(self, batches, train):
        super().__init__(batches)
        self.train = train

    def train_dataloader(self):
        yield from ({"acts": b} for b in self.train)


def _rare_sae():
    """d_in 2, d_sae 2: latent 0 fires on x₀ > 0, latent 1 only on x₁ > 0.5 (rare in the data below)."""
    sae = SAE(2, 2, ReLU(), b_dec_init="zeros").eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5]))
        sae.W_dec.copy_(torch.eye(2))
    return sae


def test_core_counts_dead_latents_over_the_window_reading_the_training_stream_after_the_val_split(tmp_path):
    # latent 1 fires once every 100 rows; 64 held-out rows never see it
    def rows(n, start):
        x = torch.zeros(n, 2)
        x[:, 0] = 1.0
        x[[i for i in range(n) if (start + i) % 100 == 99], 1] = 1.0
        return x

    val = [rows(32, 0), rows(32, 32)]
    train = [rows(50, 64 + 50 * i) for i in range(100)]
    few = Core(plot=False)(_rare_sae(), _TrainSource(val, train), tmp_path)
    assert few.metrics["dead_frac"] == 0.5 and few.metrics["dead_window_tokens"] == 64  # no window: val only
    res = Core(plot=False, dead_window_tokens=300)(_rare_sae(), _TrainSource(val, train), tmp_path)
    # 64 held-out rows, then training batches of 50 until ≥ 300 rows: 64 + 5·50 = 314, latent 1 fired 3 times
    assert res.metrics["dead_window_tokens"] == 314 and res.metrics["dead_frac"] == 0.0
    assert res.data["density"] == pytest.approx([1.0, 3 / 314])
    assert res.metrics["n_tokens"] == 64  # L0 and FVU stay on the held-out rows


def test_core_says_when_the_source_holds_fewer_tokens_than_the_window(tmp_path, capsys):
    x = torch.ones(8, 2)
    res = Core(plot=False, dead_window_tokens=1000)(_rare_sae(), Source([x, x]), tmp_path)
    assert res.metrics["dead_window_tokens"] == 16 and res.metrics["dead_frac"] == 0.0
    assert "counted over 16 tokens, fewer than the dead window (1,000)" in capsys.readouterr().out
