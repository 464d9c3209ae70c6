"""bf16-mixed training (`trainer.precision=bf16-mixed`): the encoder product and the top-k selection run in
bf16, the decoder, every loss term, the gradients, the optimiser state, checkpoints and exports stay fp32
(`saelab.sae.model`, `saelab.kernels`), as in sparsify's bf16 GPU setup.

Precision bounds use bf16's unit roundoff u = 2⁻⁸ (8 significant bits, round to nearest): autocast rounds
x_in, W_enc and b_enc to bf16 (relative error ≤ u each), accumulates in fp32 and rounds π to bf16, so
|π_bf16 − π| ≤ (2u + u²)·(|x_in| |W_enc|) + u·|b_enc| + u·|π_bf16| (fp32 accumulation adds ~d_in·2⁻²⁴).
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from support import synthetic_small
from torch.utils._python_dispatch import TorchDispatchMode

from saelab.eval.metrics import FeatureRecovery
from saelab.io import load_sae, save_sae
from saelab.kernels import has_onednn_linear, topk_indices
from saelab.objectives import Objective
from saelab.objectives.terms import FVU, L1, MSE, AuxK, Matryoshka, Ortho, Tilted
from saelab.sae import SAE
from saelab.sae.activations import BatchTopK, ReLU, TopK
from saelab.train import fit
from saelab.types import TrainState

BF16, FP32 = torch.bfloat16, torch.float32
U = 2.0**-8  # bf16 unit roundoff
D_IN, D_SAE, K, BATCH = 32, 256, 7, 48  # odd k: with duplicated latents the k-th place is a tie

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)
DEVICES = ["cpu", CUDA]


def make_sae(act, device: str = "cpu", twins: bool = False, seed: int = 0) -> SAE:
    """An fp32 SAE with non-zero biases; `twins`: latent j + d_sae/2 copies latent j, so every π is tied."""
    sae = SAE(D_IN, D_SAE, act, b_dec_init="zeros", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        if twins:
            half = D_SAE // 2
            sae.W_enc[:, half:] = sae.W_enc[:, :half]
            sae.b_enc[half:] = sae.b_enc[:half]
    return sae.to(device)


def make_x(device: str = "cpu", seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, D_IN, generator=g) + 0.5).to(device)


def by_hand(pre: torch.Tensor, k: int, batch_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection computed from the bf16 π directly: the k largest of each row (the batch·k largest of
    the batch), ties to the lowest (row, latent) index: a stable descending sort of the exact values."""
    batch, d_sae = pre.shape
    exact = pre.double()
    if batch_topk:
        idx = torch.sort(exact.reshape(-1), descending=True, stable=True).indices[: k * batch].sort().values
        return idx // d_sae, idx % d_sae
    cols = torch.sort(exact, dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
    return torch.arange(batch, device=pre.device).repeat_interleave(k), cols.reshape(-1)


PRODUCTS = {
    "addmm",
    "_linear_pointwise",
    "mm",
    "bmm",
    "mv",
    "addmv",
    "addmm_",
    "_embedding_bag",
    "sparse_sampled_addmm",
}


class Products(TorchDispatchMode):
    """Records (op, output dtype, output shape) of every matrix product and embedding-bag that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in PRODUCTS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.seen.append((name, first.dtype, tuple(first.shape)))
        return out


def assert_fp32_training_state(sae: SAE, opt: torch.optim.Optimizer) -> None:
    for name, p in sae.named_parameters():
        assert p.dtype == FP32 and p.grad is not None and p.grad.dtype == FP32, name
    opt.step()
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    assert states and all(v.dtype == FP32 for v in states)  # Adam's moments follow the fp32 parameters
    assert all(p.dtype == FP32 for p in sae.parameters())


# ------------------------------------------------------------------------------------------- (a) dtypes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("twins", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_autocast_runs_the_encoder_product_and_selection_in_bf16_and_the_rest_in_fp32(kind, twins, device):
    batch_topk = kind == "batchtopk"
    sae = make_sae(BatchTopK(K) if batch_topk else TopK(K), device, twins)
    x = make_x(device)
    objective = Objective({"mse": MSE(), "fvu": FVU()})
    product = "_linear_pointwise" if device == "cpu" and has_onednn_linear(BF16) else "addmm"  # checked once
    rec = Products()
    with rec, torch.autocast(device, dtype=BF16):
        out = sae(x)
        loss, logs = objective(out, sae, TrainState())
    forward = list(rec.seen)
    with rec:
        loss.backward()  # as Lightning does it: outside the autocast block
    backward = rec.seen[len(forward) :]

    # the encoder product is the one bf16 product (on CPU oneDNN's prepacked linear where torch has it,
    # see kernels.encoder_affine); the decoder (embedding-bag) and the backward are fp32
    assert [(n, d) for n, d, _ in forward if d != FP32] == [(product, BF16)]
    assert ("_embedding_bag", FP32, (BATCH, D_IN)) in forward
    assert backward and all(d == FP32 for _, d, _ in backward)
    assert out.pre_acts.dtype == BF16
    with torch.no_grad(), torch.autocast(device, dtype=BF16):
        pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)  # what autocast makes of π, by hand
    assert pre.dtype == BF16 and torch.equal(out.pre_acts, pre)

    # the selection is the top-k of that bf16 π, ties to the lowest index, exactly k per row (batch·k)
    rows, cols = by_hand(pre, K, batch_topk)
    assert out.sparse is not None
    assert torch.equal(out.sparse.rows, rows) and torch.equal(out.sparse.cols, cols)
    if twins:  # every π has a twin (j + d_sae/2 copies j): a twin is never taken without its latent j
        key, upper = rows * D_SAE + cols, cols >= D_SAE // 2
        assert bool(upper.any()) and bool(torch.isin(key[upper] - D_SAE // 2, key).all())
    # the selected values are the bf16 π, upcast exactly; x, codes, x̂ and the losses are fp32
    assert out.sparse.vals.dtype == FP32
    assert torch.equal(out.sparse.vals, pre[rows, cols].float().relu())
    assert out.x.dtype == FP32 and torch.equal(out.x, x)
    assert out.codes.dtype == FP32 and out.x_hat.dtype == FP32
    assert loss.dtype == FP32 and all(v.dtype == FP32 for v in logs.values())
    assert_fp32_training_state(sae, torch.optim.Adam(sae.parameters(), lr=1e-3))


@pytest.mark.parametrize("device", DEVICES)
def test_dense_sae_under_autocast_upcasts_pi_before_the_activation(device):
    sae = make_sae(ReLU(), device)
    x = make_x(device)
    rec = Products()
    with rec, torch.autocast(device, dtype=BF16):
        out = sae(x)
        loss, _ = Objective({"mse": MSE(), "l1": L1()})(out, sae, TrainState())
    loss.backward()
    # the encoder product is bf16, the dense decoder product fp32
    assert [(n, d, s) for n, d, s in rec.seen] == [
        ("addmm", BF16, (BATCH, D_SAE)),
        ("mm", FP32, (BATCH, D_IN)),
    ]
    assert out.pre_acts.dtype == FP32 and out.codes.dtype == FP32 and out.x_hat.dtype == FP32
    assert loss.dtype == FP32
    assert_fp32_training_state(sae, torch.optim.Adam(sae.parameters(), lr=1e-3))


@pytest.mark.parametrize(("fill", "decode"), [(1, "_embedding_bag"), (AuxK.DENSE_FILL, "mm")])
def test_auxk_ranks_bf16_dead_latents_and_decodes_them_in_fp32(fill, decode):
    sae = make_sae(TopK(K))
    x = make_x()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::4] = True
    term, state = AuxK(k_aux=16), TrainState(dead_mask=dead)
    term.DENSE_FILL = fill  # 16 codes over D_SAE/4 = 64 dead latents: sparse with 1, dense with 16
    out = sae(x)
    ref = term(out, sae, state)
    rec = Products()
    with rec, torch.autocast("cpu", dtype=BF16):
        value = term(out, sae, state)
    # the dead-latent π is an encoder product (bf16, as sparsify's AuxK ranks its bf16 π); the decode is fp32
    assert [(n, d) for n, d, _ in rec.seen] == [("addmm", BF16), (decode, FP32)]
    assert value.dtype == FP32
    assert value.item() == pytest.approx(ref.item(), rel=0.05)  # the normalised error of a few bf16 codes
    value.backward()
    assert all(p.grad is None or p.grad.dtype == FP32 for p in sae.parameters())


def test_loss_terms_are_unchanged_by_autocast():
    """Given the same fp32 step output, every term that has no encoder product of its own (all but AuxK)
    gives the same value and gradients with and without autocast: nothing in them is bf16."""
    terms = {
        "mse": MSE(),
        "fvu": FVU(),
        "tilted": Tilted(t=2.0),
        "l1": L1(),
        "matryoshka": Matryoshka(groups=[64, 64, 128]),
        "ortho": Ortho(chunk_size=64, gram_dtype="float32"),
    }
    for act in (TopK(K), ReLU()):  # the sparse and the dense decode of Matryoshka's blocks
        sae, x = make_sae(act), make_x()
        out = sae(x)
        for name, term in terms.items():
            got = []
            for autocast in (False, True):
                sae.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=BF16, enabled=autocast):
                    value = term(out, sae, TrainState(step=0, seed=3))
                value.backward(retain_graph=True)
                got.append((value.detach(), [p.grad.clone() for p in sae.parameters() if p.grad is not None]))
            (v0, g0), (v1, g1) = got
            assert v1.dtype == FP32 and torch.equal(v0, v1), name
            assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1)), name


def test_topk_indices_breaks_ties_to_the_lowest_index_exactly_k_per_row():
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(64, 1000, generator=g).to(BF16),  # bf16 ties at the boundary in about half the rows
        torch.randint(-3, 4, (16, 300), generator=g).to(BF16),  # groups past the candidates: the exact pass
        torch.zeros(4, 50, dtype=BF16),  # everything tied
        (torch.randn(8, 200, generator=g) * 4).round().to(torch.float16),
    ]
    for v in cases:
        for k in (1, 5, v.shape[1] // 3, v.shape[1]):
            want = torch.sort(v.double(), dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
            assert torch.equal(topk_indices(v, k), want)
    flat = torch.randn(1, 20000, generator=g).to(BF16)  # BatchTopK's flat selection, many ties
    want = torch.sort(flat[0].double(), descending=True, stable=True).indices[:600].sort().values
    assert torch.equal(topk_indices(flat, 600)[0], want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_topk_indices_picks_the_same_latents_on_cuda_as_on_cpu():
    g = torch.Generator().manual_seed(1)
    for v, k in (
        (torch.randn(256, 4096, generator=g).to(BF16), 32),
        (torch.randn(1, 65536, generator=g).to(BF16), 2048),
    ):
        assert torch.equal(topk_indices(v.cuda(), k).cpu(), topk_indices(v, k))


def test_batchtopk_inference_threshold_is_compared_exactly():
    act = BatchTopK(K)
    act.threshold.fill_(1.0 + 2.0**-7 - 2.0**-10)  # just below the bf16 value 1 + 2⁻⁷, to which it rounds
    act.eval()
    pre = torch.tensor([[1.0, 1.0 + 2.0**-7, 0.5]], dtype=BF16)
    rows, cols = act.select(pre)
    assert cols.tolist() == [1]  # a bf16 comparison would round θ up to 1 + 2⁻⁷ and keep nothing


# ------------------------------------------------------------------------------------------- (b) closeness


def pi_error_bound(sae: SAE, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Bound on |π_bf16 − π| per entry (module docstring), with 5% slack for the fp32 accumulation."""
    x_in = (x - sae.b_dec).abs()
    b = (2 * U + U * U) * (x_in @ sae.W_enc.abs()) + U * sae.b_enc.abs() + U * pre.float().abs()
    return 1.05 * b + D_IN * 2.0**-24


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu"])
def test_autocast_x_hat_is_within_bf16_rounding_of_the_fp32_x_hat(kind):
    act = {"topk": TopK(K), "batchtopk": BatchTopK(K), "relu": ReLU()}[kind]
    sae, x = make_sae(act), make_x()
    with torch.no_grad():
        ref = sae(x)
        with torch.autocast("cpu", dtype=BF16):
            out = sae(x)
        bound = pi_error_bound(sae, x, out.pre_acts)  # (batch, d_sae)
        # where the codes come from the same latents, |Δf| ≤ |Δπ| (ReLU is 1-Lipschitz), so
        # |Δx̂| ≤ Σ_j |Δπ_j| |W_dec[j]| over the selected latents (and 1e-5 for the fp32 decode's own rounding)
        if kind == "relu":
            same = torch.ones(BATCH, dtype=torch.bool)
            sel = (ref.pre_acts > 0) | (out.pre_acts > 0)
        else:
            same = (ref.codes != 0).eq(out.codes != 0).all(-1)
            sel = out.codes != 0
        dx = (out.x_hat - ref.x_hat).abs()
        limit = (bound * sel) @ sae.W_dec.abs() + 1e-5
        assert bool((dx[same] <= limit[same]).all())
        assert same.float().mean() >= 0.75  # a row differs only where two π lie within bf16 rounding
        # rows whose selection differs swapped near-equal latents: the loss barely moves
        mse = lambda o: (o.x - o.x_hat).pow(2).sum(-1).mean()  # noqa: E731
        assert mse(out).item() == pytest.approx(mse(ref).item(), rel=0.02)


# ------------------------------------------------------------------------------------------- (c) a real fit


@pytest.fixture
def one_thread():
    """Tiny fits are overhead-bound; with the 2 shared cores busy, one thread is far faster and steadier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FIT = [
    "logger=none",
    "+trainer.enable_progress_bar=false",
    "dashboards.density_every=0",
    "trainer.precision=bf16-mixed",
]


@pytest.mark.parametrize(
    "variant",
    [
        ["sae=topk", "objective/terms=[mse,auxk]"],
        ["sae=batchtopk", "objective/terms=[matryoshka,auxk,ortho]", "objective.terms.ortho.chunk_size=32"],
    ],
    ids=["topk", "batchtopk"],
)
def test_bf16_mixed_fit_trains_in_bf16_and_keeps_checkpoint_and_export_fp32(variant, tmp_path, one_thread):
    cfg = compose_cfg(
        [
            *synthetic_small(),
            *variant,
            *FIT,
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "checkpoint.every_n_steps=3",
            "lit.dead_window_tokens=64",  # latents die within the run, so AuxK has work to do
        ]
    )
    sae = instantiate(cfg.sae)
    steps: list[tuple[torch.dtype, ...]] = []  # (π, x, x̂) of each training step's forward

    def hook(module, args, out) -> None:
        if torch.is_grad_enabled():  # not the held-out health check after the fit, which has no autocast
            steps.append((out.pre_acts.dtype, out.x.dtype, out.x_hat.dtype))

    sae.register_forward_hook(hook)
    res = fit(cfg, tmp_path, sae=sae)
    assert res.trainer.global_step == 6
    assert steps == [(BF16, FP32, FP32)] * 6  # Lightning's bf16-mixed autocasts the step on CPU

    ckpt = torch.load(tmp_path / "checkpoints" / "train" / "last.ckpt", weights_only=True)
    weights = {k: v for k, v in ckpt["state_dict"].items() if v.is_floating_point()}
    assert weights and all(v.dtype == FP32 for v in weights.values()), {
        k: v.dtype for k, v in weights.items()
    }
    moments = [v for s in ckpt["optimizer_states"][0]["state"].values() for v in s.values() if v.ndim]
    assert moments and all(v.dtype == FP32 for v in moments)

    export = load_sae(save_sae(res.sae, tmp_path / "sae"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(export, name).dtype == FP32
        assert torch.equal(getattr(export, name), ckpt["state_dict"][f"sae.{name}"])


# ------------------------------------------------------------------------------------------- (d) quality


def recovery_after_fit(precision: str, tmp_path) -> float:
    # 256 TopK latents (k 4) on 128 true features in 32 dims, 600 steps of 512: recovery ≈ 0.89, far from
    # both chance and saturation, so a real loss of quality would show
    cfg = compose_cfg(
        [
            *synthetic_small(batch_size=512, d_sae=256),
            *FIT,
            f"trainer.precision={precision}",
            "trainer.max_steps=600",
            "trainer.limit_val_batches=0",
            "checkpoint.every_n_steps=1000",
        ]
    )
    res = fit(cfg, tmp_path / precision)
    rec = FeatureRecovery(res.datamodule.true_features, sync_on_compute=False)
    rec.update(res.sae.W_dec.detach())
    return float(rec.compute())


@pytest.mark.slow
def test_bf16_mixed_recovers_the_true_features_as_well_as_fp32(tmp_path, one_thread):
    fp32 = recovery_after_fit("32-true", tmp_path)
    bf16 = recovery_after_fit("bf16-mixed", tmp_path)
    assert fp32 > 0.8  # the comparison means something
    assert abs(bf16 - fp32) <= 0.01, (bf16, fp32)  # within 1 point of mean max cosine (measured 0.0002)
