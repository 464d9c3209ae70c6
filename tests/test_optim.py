"""`saelab.optim.Adam`: torch's fused Adam on column-major matrices through their transposes. Against
torch's single-tensor Adam (the reference implementation) on copies of the same parameters and gradients."""

from __future__ import annotations

import pytest
import torch

from saelab.optim import Adam


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(40, 24, generator=g).t()),  # column-major, like W_enc
        torch.nn.Parameter(torch.randn(40, 24, generator=g)),  # row-major, like W_dec
        torch.nn.Parameter(torch.randn(40, generator=g)),
    ]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_torch_adam_step_by_step(amsgrad, weight_decay):
    ours, ref = _params(0), _params(0)
    opt = Adam(ours, lr=1e-2, fused=True, amsgrad=amsgrad, weight_decay=weight_decay)
    ref_opt = torch.optim.Adam(ref, lr=1e-2, foreach=False, amsgrad=amsgrad, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, ref, strict=True):
            grad = torch.randn(b.shape, generator=g)
            a.grad = (
                grad.t().contiguous().t() if not a.is_contiguous() else grad.clone()
            )  # the param's own order
            b.grad = grad
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"], rtol=1e-6, atol=0
        )
    assert ours[0].stride() == (1, 24) and opt.state[ours[0]]["exp_avg"].stride() == (1, 24)  # order kept


def test_a_gradient_in_another_order_is_not_transposed():
    """A column-major parameter whose gradient arrives row-major keeps torch's own (copying) path."""
    ours, ref = _params(2), _params(2)
    opt, ref_opt = Adam(ours, lr=1e-2, fused=True), torch.optim.Adam(ref, lr=1e-2, foreach=False)
    for _ in range(3):
        for a, b in zip(ours, ref, strict=True):
            a.grad, b.grad = torch.ones(b.shape), torch.ones(b.shape)
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_loads_into_torch_adam():
    ps = _params(3)
    opt = Adam(ps, lr=1e-3, fused=True)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    other = torch.optim.Adam(_params(3), lr=1e-3)
    other.load_state_dict(opt.state_dict())
    assert float(other.state_dict()["state"][0]["step"]) == 1.0


def test_the_fused_kernel_gets_contiguous_tensors(monkeypatch):
    seen = []
    kernel = torch._fused_adam_

    def spy(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs):
        seen.append([t.is_contiguous() for t in (*params, *grads, *exp_avgs, *exp_avg_sqs)])
        return kernel(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", spy)
    ps = _params(4)
    opt = Adam(ps, lr=1e-3, fused=True)
    for p in ps:
        p.grad = torch.ones_like(p)  # ones_like keeps the parameter's order
    opt.step()
    assert seen and all(all(s) for s in seen)
