"""TopK SAE training throughput: saelab vs EleutherAI sparsify's `SparseCoder`, in one process.

Both train the same TopK SAE (Gao et al. 2024, arXiv:2406.04093) from the same weights on the same
batches: π = (x − b_dec) W_enc + b_enc, f = TopK_k(ReLU(π)), x̂ = f W_dec + b_dec, loss = FVU =
Σ‖x − x̂‖² / Σ‖x − x̄‖², Adam with the same learning rate, decoder rows kept at unit norm with the
gradient component parallel to each row removed before the step. No AuxK in either. One step =
forward + backward + parallel-gradient removal + optimiser step + decoder renormalisation.

Steps are timed interleaved (saelab, sparsify, saelab, …) after a warm-up, so load from other
processes hits both alike; the median step time gives samples/s. sparsify's `forward` turns on bf16
autocast on CUDA; it is called undecorated here so both run in fp32 as specified.

Where `saelab.kernels.screen_applies` says so (a fast-bf16 CPU and an encoder of ≥ 4 Mi weights, as at the
default size), the "saelab" row is the default screened step: the fp32 top-k is found from a bf16 product and
certified row by row (`screened_topk`), so its selection, values and gradients are the fp32 ones; "saelab
unscreened" is the same step with the plain fp32 product, and the run reports how many rows fell back.

A third row, "saelab bf16-mixed", is the saelab step under `torch.autocast(device, bfloat16)` (what
`trainer.precision=bf16-mixed` does): the encoder product and the top-k in bf16, decoder, loss and Adam in
fp32 (see `saelab.sae.model`), reported against sparsify fp32. The roofline times a plain x @ W of the
encoder's shapes ([batch, d_in] @ [d_in, d_sae]) in fp32 and bf16, interleaved with the steps, both as
`torch.mm` (MKL in fp32 on CPU, what sparsify's `F.linear` runs) and as saelab's `encoder_affine`
(oneDNN's linear on CPU), and sets the step's FLOPs against the faster one's rate: the encoder product
2·batch·d_in·d_sae, ×3 with a dense backward, plus the sparse decoder's 2·batch·k·d_in ×3. saelab's and
sparsify's encoder backward are sparse, so the one dense product a step cannot avoid is the encoder
forward: "step ÷ x@W" says how far a step is from it (the screened step does that product in bf16, so it
can go below 1).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from saelab.bench import SectionUnavailable
from saelab.kernels import ScreenStats, encoder_affine, screen_applies
from saelab.objectives import Objective
from saelab.objectives.terms import FVU
from saelab.optim import Adam
from saelab.sae import SAE
from saelab.sae.activations import TopK
from saelab.types import TrainState

LR = 1e-3  # saelab's Adam is fused, as conf/optim/adam.yaml sets it; the peers use their own defaults


@dataclass(frozen=True)
class Size:
    d_in: int
    d_sae: int
    k: int
    batch: int

    def __str__(self) -> str:
        return f"d_in={self.d_in} d_sae={self.d_sae} k={self.k} batch={self.batch}"

    def with_args(self, args: argparse.Namespace) -> Size:
        """This size with whichever of --d-in / --d-sae / --k / --batch the command line gave."""
        given = {f: getattr(args, f, None) for f in ("d_in", "d_sae", "k", "batch")}
        return replace(self, **{f: int(v) for f, v in given.items() if v is not None})


FULL = Size(768, 16384, 32, 4096)
QUICK = Size(64, 2048, 16, 512)
PARITY = Size(48, 512, 8, 64)


def make_batches(size: Size, n: int, device: str, seed: int = 0) -> list[Tensor]:
    """`n` batches of correlated, off-centre Gaussian activations (so b_dec and the FVU denominator matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(size.d_in, size.d_in, generator=g) / size.d_in**0.5
    mean = torch.randn(size.d_in, generator=g)
    return [(torch.randn(size.batch, size.d_in, generator=g) @ mix + mean).to(device) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- runners
class SaelabRunner:
    """One training step of a saelab SAE as `LitSAE` runs it (objective, constraint, optimiser).

    Defaults: a TopK(k) SAE on FVU. `activation` and `objective` swap in another SAE and loss
    (the variants section); `dead_mask` is the dead-latent set the objective's AuxK sees, and the step
    counter advances so that terms computed every n-th step (`Ortho`) run on their own schedule.
    """

    name = "saelab"

    def __init__(
        self,
        size: Size,
        device: str,
        seed: int = 0,
        activation: nn.Module | None = None,
        objective: Objective | None = None,
        dead_mask: Tensor | None = None,
        dtype: str = "float32",
        bf16_mixed: bool = False,
        screen: bool | None = None,
    ) -> None:
        self.bf16_mixed = bf16_mixed  # the step under bf16 autocast, as trainer.precision=bf16-mixed runs it
        self.device_type = torch.device(device).type
        if bf16_mixed:
            self.name = "saelab bf16-mixed"
        act = activation if activation is not None else TopK(size.k, screen=screen)
        self.sae = SAE(size.d_in, size.d_sae, act, b_dec_init="zeros", seed=seed, dtype=dtype).to(device)
        self.objective = objective if objective is not None else Objective({"fvu": FVU()})
        self.dead_mask = dead_mask.to(device) if dead_mask is not None else None
        self.opt = Adam(self.sae.parameters(), lr=LR, fused=True)  # as conf/optim/adam.yaml
        self.n_steps = 0

    def loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mixed = torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16_mixed else None
        with mixed or contextlib.nullcontext():  # Lightning autocasts the forward and loss, not the backward
            out = self.sae(x)
            state = TrainState(step=self.n_steps, dead_mask=self.dead_mask)
            loss, _ = self.objective(out, self.sae, state)
        return loss, out.x_hat

    def step(self, x: Tensor) -> Tensor:
        loss, _ = self.loss(x)
        loss.backward()
        self.sae.remove_parallel_decoder_grad()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sae.set_decoder_norm_to_unit()
        self.n_steps += 1
        return loss.detach()


class SparsifyRunner:
    """The same step with sparsify's `SparseCoder`, its FVU and its decoder-constraint methods."""

    name = "sparsify"

    def __init__(self, size: Size, device: str, init: SAE | None = None) -> None:
        from sparsify import SparseCoder, SparseCoderConfig

        cfg = SparseCoderConfig(activation="topk", num_latents=size.d_sae, k=size.k, normalize_decoder=True)
        self.sc = SparseCoder(size.d_in, cfg, device=device, dtype=torch.float32)
        if (
            init is not None
        ):  # identical starting point: sparsify stores the encoder as nn.Linear ([d_sae, d_in])
            with torch.no_grad():
                self.sc.encoder.weight.copy_(init.W_enc.t())
                self.sc.encoder.bias.copy_(init.b_enc)
                self.sc.W_dec.copy_(init.W_dec)
                self.sc.b_dec.copy_(init.b_dec)
        # the forward is wrapped in bf16 autocast on CUDA; unwrap it so both sides run in fp32
        self._forward = getattr(type(self.sc).forward, "__wrapped__", type(self.sc).forward)
        self.opt = torch.optim.Adam(self.sc.parameters(), lr=LR)

    def loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self._forward(self.sc, x)
        return out.fvu, out.sae_out

    def step(self, x: Tensor) -> Tensor:
        loss, _ = self.loss(x)
        loss.backward()
        self.sc.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sc.set_decoder_norm_to_unit_norm()
        return loss.detach()


class SAELensRunner:
    """The same TopK step with SAELens's `TopKTrainingSAE` (its training forward and loss, Adam), as its
    trainer runs it: MSE on the reconstruction, no AuxK (no dead mask), SAELens's own decoder handling
    (`rescale_acts_by_decoder_norm`, no unit-norm constraint). Starts from the same weights."""

    name = "SAELens"

    def __init__(self, size: Size, device: str, init: SAE | None = None) -> None:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        cfg = TopKTrainingSAEConfig(d_in=size.d_in, d_sae=size.d_sae, k=size.k, device=device)
        self.sae = TopKTrainingSAE(cfg)
        if init is not None:
            with torch.no_grad():
                for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    getattr(self.sae, name).copy_(getattr(init, name))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR)
        self.n_steps = 0

    def step(self, x: Tensor) -> Tensor:
        from sae_lens.saes.sae import TrainStepInput

        inp = TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=None,
            n_training_steps=self.n_steps,
            is_logging_step=False,
        )
        loss = self.sae.training_forward_pass(inp).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.n_steps += 1
        return loss.detach()


def _saelens_version() -> str | None:
    try:
        import sae_lens
    except ImportError:
        return None
    return str(getattr(sae_lens, "__version__", "?"))


class MatmulRunner:
    """A dense product of the encoder's shapes, [batch, d_in] @ [d_in, d_sae], in `dtype` (the roofline):
    `torch.mm` (what sparsify's `F.linear` runs; MKL in fp32 on CPU) or, with `affine=True`, saelab's
    `encoder_affine` with a zero bias (oneDNN's linear on CPU where torch has it, else the same mm)."""

    def __init__(self, size: Size, device: str, dtype: torch.dtype, affine: bool = False) -> None:
        self.name = f"x @ W {str(dtype).removeprefix('torch.')}" + (" (encoder_affine)" if affine else "")
        g = torch.Generator().manual_seed(0)
        W = torch.randn(size.d_sae, size.d_in, generator=g).t() / size.d_in**0.5  # column-major, as W_enc
        self.W, self.dtype, self.affine = W.to(device=device, dtype=dtype), dtype, affine
        self.b = torch.zeros(size.d_sae, device=device, dtype=dtype)
        self._x: dict[int, Tensor] = {}  # each batch cast once, outside the timed product

    def step(self, x: Tensor) -> Tensor:
        xc = self._x.get(id(x))
        if xc is None:
            xc = self._x[id(x)] = x.to(self.dtype)
        if self.affine:
            return encoder_affine(xc, self.W, self.b, self.dtype)
        return xc @ self.W


def step_flops(size: Size) -> dict[str, float]:
    """FLOPs of one step: the encoder product 2·batch·d_in·d_sae (forward; ×3 with a dense backward) and
    the sparse decoder 2·batch·k·d_in ×3 (forward, ∂L/∂f and ∂L/∂W_dec)."""
    enc = 2.0 * size.batch * size.d_in * size.d_sae
    dec = 2.0 * size.batch * size.k * size.d_in
    return {"encoder": enc, "encoder_x3": 3 * enc, "decoder_x3": 3 * dec, "total": 3 * enc + 3 * dec}


def _runner(which: str, size: Size, device: str):
    if which == "sparsify":
        return SparsifyRunner(size, device)
    return SaelabRunner(size, device, bf16_mixed=which == "saelab bf16-mixed")


def _sparsify_version() -> str:
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints which decoder kernel it picked
            import sparsify
    except ImportError as e:
        raise SectionUnavailable(
            f"EleutherAI sparsify is not installed ({e}); `make bench` installs it (pip install -e '.[bench]')"
        ) from None
    return getattr(sparsify, "__version__", "?")


# ---------------------------------------------------------------------------------------------- checks
def _grad(p: Tensor) -> Tensor:
    if p.grad is None:
        raise RuntimeError("parity: a saelab parameter got no gradient from the backward pass.")
    return p.grad


def parity(device: str) -> dict[str, float]:
    """Same weights, same batch: max |Δx̂|, |Δloss| and max |Δ∂L/∂W| between the two at step 0 (fp32)."""
    a = SaelabRunner(PARITY, device, seed=1)
    with torch.no_grad():  # non-zero biases, so the b_dec and b_enc paths are exercised too
        a.sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        a.sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    b = SparsifyRunner(PARITY, device, init=a.sae)
    x = make_batches(PARITY, 1, device, seed=4)[0]
    la, xa = a.loss(x)
    lb, xb = b.loss(x)
    la.backward()
    lb.backward()
    pairs = [
        (_grad(a.sae.W_enc).t(), b.sc.encoder.weight.grad),
        (_grad(a.sae.b_enc), b.sc.encoder.bias.grad),
        (_grad(a.sae.W_dec), b.sc.W_dec.grad),
        (_grad(a.sae.b_dec), b.sc.b_dec.grad),
    ]
    with torch.no_grad():
        return {
            "x_hat": float((xa - xb).abs().max()),
            "loss": float((la - lb).abs()),
            "grad": max(float((ga - gb).abs().max()) for ga, gb in pairs),
        }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    runners: list,
    batches: list[Tensor],
    warmup: int,
    steps: int,
    device: str,
    block: int = 1,
    cpu_times: list[list[float]] | None = None,
) -> list[list[float]]:
    """Seconds per step for each runner, alternating runners step by step on the same batch sequence.

    Each sample is the mean time of `block` steps of one runner (its own consecutive steps, so a term
    computed every `block`-th step is counted once per sample), taken in a round in which the runners
    take turns after every step (in a rotating order): each runner's steps lie seconds from the others', so drift in the
    machine's speed cancels in the ratios. `steps` is the number of samples per runner. `cpu_times`, if
    given, gets one list per runner of this process's CPU seconds per step over the same samples (on a
    CPU run, less disturbed than wall time by other processes).
    """
    for i in range(warmup):
        for r in runners:
            r.step(batches[i % len(batches)])
    _sync(device)
    times: list[list[float]] = [[] for _ in runners]
    cpu: list[list[float]] = [[] for _ in runners]
    for i in range(steps):
        xs = [batches[(warmup + i * block + b) % len(batches)] for b in range(block)]
        wall, proc = [0.0] * len(runners), [0.0] * len(runners)
        for b, x in enumerate(xs):
            # the order rotates by one each step: every runner takes every position equally often, and with
            # three or more runners none runs twice in a row (which would favour it through warm caches)
            shift = (i * block + b) % len(runners)
            for j in [*range(shift, len(runners)), *range(shift)]:
                r = runners[j]
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                r.step(x)
                _sync(device)
                wall[j] += time.perf_counter() - t0
                proc[j] += time.process_time() - c0
        for j in range(len(runners)):
            times[j].append(wall[j] / block)
            cpu[j].append(proc[j] / block)
    if cpu_times is not None:
        cpu_times[:] = cpu
    return times


# ---------------------------------------------------------------------------------------------- memory
def _rss_child(which: str, size: Size, device: str, queue) -> None:
    """Peak resident-set growth (MiB) during one warm training step, measured in a fresh process."""
    try:
        if which == "sparsify":
            _sparsify_version()  # quiet import
        runner = _runner(which, size, device)
        xs = make_batches(size, 2, device)
        for x in xs:  # allocate optimiser state and warm every code path first
            runner.step(x)

        def status(key: str) -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current RSS
        base = status("VmRSS")
        runner.step(xs[0])
        queue.put((status("VmHWM") - base) / 1024)
    except Exception as e:  # pragma: no cover - reported as n/a by the parent
        queue.put(f"{type(e).__name__}: {e}")


def peak_step_memory(which: str, size: Size, device: str) -> float | str:
    """Peak memory above the resident weights and optimiser state during one step, in MiB.

    CUDA: the allocator's peak. CPU: peak RSS growth in a spawned process with a fixed small mmap
    threshold, so glibc returns freed buffers at once and the high-water mark sees each step's own peak.
    """
    if device.startswith("cuda"):
        runner = _runner(which, size, device)
        xs = make_batches(size, 2, device)
        for x in xs:
            runner.step(x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step(xs[0])
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del runner, xs
        torch.cuda.empty_cache()
        return peak
    if not sys.platform.startswith("linux"):
        return "n/a"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    try:
        proc = ctx.Process(target=_rss_child, args=(which, size, device, queue))
        proc.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    try:
        result = queue.get(timeout=900)
    except Exception:
        result = "n/a (timed out)"
    proc.join(timeout=30)
    return result


# ---------------------------------------------------------------------------------------------- report
def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def bf16_parity(device: str) -> dict[str, float]:
    """saelab under bf16 autocast against saelab fp32, same weights and batch, step 0: the share of rows whose
    top-k is the same (bf16 π reorders near-equal latents), ‖Δx̂‖/‖x̂‖ over those rows, and |Δloss|/loss."""
    a, b = SaelabRunner(PARITY, device, seed=1), SaelabRunner(PARITY, device, seed=1, bf16_mixed=True)
    x = make_batches(PARITY, 1, device, seed=4)[0]
    with torch.no_grad():
        la, xa = a.loss(x)
        lb, xb = b.loss(x)
        out_a = a.sae(x)
        with torch.autocast(b.device_type, dtype=torch.bfloat16):
            out_b = b.sae(x)
        same = (out_a.codes != 0).eq(out_b.codes != 0).all(-1)  # (batch,)
        return {
            "x_hat": float((xa - xb)[same].norm() / xa[same].norm()),
            "loss": float((la - lb).abs() / la.abs()),
            "same": float(same.float().mean()),
        }


@torch.no_grad()
def screen_parity(sae: SAE, x: Tensor) -> dict[str, float]:
    """The screened SAE against the same weights unscreened on one batch: the share of rows with the same
    top-k and the largest |Δx̂|."""
    act = sae.activation
    if not isinstance(act, TopK):
        raise TypeError(f"screen_parity needs a TopK SAE, got {type(act).__name__}")
    screen = act.screen
    try:
        a = sae(x)
        act.screen = False
        b = sae(x)
    finally:
        act.screen = screen
    same = (a.sparse.cols.view(x.shape[0], -1) == b.sparse.cols.view(x.shape[0], -1)).all(-1)
    return {"same": float(same.float().mean()), "x_hat": float((a.x_hat - b.x_hat).abs().max())}


def _rate(flops: float, seconds: float) -> str:
    """FLOP/s in the unit that keeps it readable (GFLOP/s, or TFLOP/s from 10 TFLOP/s)."""
    r = flops / seconds
    return f"{r / 1e12:,.1f} TFLOP/s" if r >= 1e13 else f"{r / 1e9:,.0f} GFLOP/s"


def main(args: argparse.Namespace) -> list[str]:
    version = _sparsify_version()
    device = str(getattr(args, "device", None) or "cpu")
    quick = bool(getattr(args, "quick", False))
    size = (QUICK if quick else FULL).with_args(args)
    steps = getattr(args, "steps", None) or (20 if quick else 12)
    warmup = 2
    torch.manual_seed(0)

    lines = [
        f"TopK SAE training step, {size}, fp32 (and saelab under bf16 autocast), {device}"
        + (
            f" ({torch.get_num_threads()} threads)"
            if device.startswith("cpu")
            else f" ({torch.cuda.get_device_name()})"
        ),
        f"saelab vs sparsify {version} (SparseCoder), torch {torch.__version__}; Adam lr={LR}, FVU loss, "
        "unit-norm decoder + parallel-grad removal, no AuxK",
    ]
    p = parity(device)
    lines.append(
        f"parity: max |Δx̂| = {p['x_hat']:.2e}, |Δloss| = {p['loss']:.2e}, max |Δgrad| = {p['grad']:.2e} "
        f"(same weights, {PARITY})"
    )
    q = bf16_parity(device)
    lines.append(
        f"bf16-mixed vs fp32 saelab: rows with the same top-k {q['same']:.0%}, on them ‖Δx̂‖/‖x̂‖ = "
        f"{q['x_hat']:.1e}; |Δloss|/loss = {q['loss']:.1e} (same weights, {PARITY}; bf16: 8 significant bits)"
    )

    a = SaelabRunner(size, device, seed=0)
    screened = screen_applies(None, a.sae.W_enc, size.k)
    runners = {
        "saelab": a,
        "sparsify": SparsifyRunner(size, device, init=a.sae),
        "saelab bf16-mixed": SaelabRunner(size, device, seed=0, bf16_mixed=True),
        "x @ W fp32": MatmulRunner(size, device, torch.float32),
        "x @ W bf16": MatmulRunner(size, device, torch.bfloat16),
        "affine fp32": MatmulRunner(size, device, torch.float32, affine=True),
        "affine bf16": MatmulRunner(size, device, torch.bfloat16, affine=True),
    }
    if screened:  # the same fp32 step with the plain fp32 product and top-k, for comparison
        runners["saelab unscreened"] = SaelabRunner(size, device, seed=0, screen=False)
    lens_version = _saelens_version()  # the `interop` extra installs it
    if lens_version:
        runners["SAELens"] = SAELensRunner(size, device, init=a.sae)
    batches = make_batches(size, 4, device, seed=0)
    ScreenStats.reset()
    times = dict(
        zip(runners, time_interleaved(list(runners.values()), batches, warmup, steps, device), strict=True)
    )
    fallback = ScreenStats.fallback / max(ScreenStats.rows, 1)
    retried = ScreenStats.retried / max(ScreenStats.rows, 1)
    if screened:
        sc = screen_parity(a.sae, batches[0])
    del a, runners, batches
    med = {key: statistics.median(t) for key, t in times.items()}
    names = ("saelab", "sparsify", "saelab bf16-mixed")
    if getattr(args, "memory", True):
        mem = {name: peak_step_memory(name, size, device) for name in names}
    else:
        mem = dict.fromkeys(names, "skipped")

    labels = {
        "saelab": "saelab" + (" (screened)" if screened else ""),
        "sparsify": f"sparsify {version}",
        "saelab bf16-mixed": "saelab bf16-mixed",
        "saelab unscreened": "saelab unscreened",
        "SAELens": f"SAELens {lens_version}",
    }
    rows = []
    base = med["sparsify"]
    for key, label in labels.items():
        if key not in med:
            continue
        m, mem_m = med[key], mem.get(key, "not measured")
        mem_s = f"{mem_m:.0f}" if isinstance(mem_m, float) else str(mem_m)
        rows.append(
            [label, f"{size.batch / m:,.0f}", f"{base / m:.2f}x", f"{m * 1e3:.1f}", f"{min(times[key]) * 1e3:.1f}", mem_s]
        )  # fmt: skip
    headers = [
        "implementation",
        "samples/s",
        "vs sparsify fp32",
        "median step ms",
        "min step ms",
        "peak step MiB",
    ]
    lines += ["", *_table(headers, rows), ""]
    lines.append(
        f"ratio saelab/sparsify: {base / med['saelab']:.2f}x samples/s; saelab bf16-mixed/sparsify fp32: "
        f"{base / med['saelab bf16-mixed']:.2f}x ({steps} interleaved steps each after {warmup} warm-up; median)"
    )
    if lens_version:
        lines.append(
            f"ratio saelab/SAELens {lens_version} (TopKTrainingSAE): {med['SAELens'] / med['saelab']:.2f}x samples/s"
        )
    if screened:
        lines.append(
            f"screened: the fp32 top-k found from a bf16 product, certified row by row "
            f"(saelab.kernels.screened_topk); during the timed steps {retried:.2%} of rows needed the wider "
            f"second pass and {fallback:.2%} fell back to the fp32 product; against the unscreened step on one batch: the same top-k in {sc['same']:.2%} "
            f"of rows, max |Δx̂| = {sc['x_hat']:.1e}. Unscreened: {base / med['saelab unscreened']:.2f}x sparsify"
        )
    mem_a, mem_b, mem_c = (mem[n] for n in names)
    if isinstance(mem_a, float) and isinstance(mem_b, float):
        lines.append(
            f"peak step memory saelab/sparsify: {mem_a / mem_b:.2f}x"
            + (f"; saelab bf16-mixed/sparsify: {mem_c / mem_b:.2f}x" if isinstance(mem_c, float) else "")
        )
        lines.append(
            "(peak step MiB: "
            + (
                "allocator peak above weights + optimiser state"
                if device.startswith("cuda")
                else "peak RSS growth during one warm step, each in a fresh process"
            )
            + ")"
        )

    # roofline: the step's FLOPs against the faster dense product of the encoder's shapes, timed among the
    # steps: torch.mm or encoder_affine (oneDNN's linear on CPU)
    fl = step_flops(size)
    mm32, mm16, af32, af16 = (med[k] for k in ("x @ W fp32", "x @ W bf16", "affine fp32", "affine bf16"))
    t32, t16 = min(mm32, af32), min(mm16, af16)
    lines += [
        "",
        f"roofline: x @ W, [{size.batch}, {size.d_in}] @ [{size.d_in}, {size.d_sae}]: fp32 {t32 * 1e3:.1f} ms "
        f"({_rate(fl['encoder'], t32)}), bf16 {t16 * 1e3:.1f} ms ({_rate(fl['encoder'], t16)}, "
        f"{t32 / t16:.2f}x fp32), the faster of torch.mm (fp32 {mm32 * 1e3:.1f} ms, bf16 {mm16 * 1e3:.1f} ms) "
        f"and saelab's encoder_affine (fp32 {af32 * 1e3:.1f} ms, bf16 {af16 * 1e3:.1f} ms)",
        f"step FLOPs: encoder 2·batch·d_in·d_sae = {fl['encoder'] / 1e9:.2f} G (×3 with a dense backward: "
        f"{fl['encoder_x3'] / 1e9:.2f} G) + sparse decoder 2·batch·k·d_in ×3 = {fl['decoder_x3'] / 1e9:.3f} G "
        f"= {fl['total'] / 1e9:.2f} GFLOP",
    ]
    roof = []
    for key, t_mm in (
        ("saelab", t32),
        ("saelab unscreened", t32),
        ("sparsify", t32),
        ("saelab bf16-mixed", t16),
    ):
        if key not in med:
            continue
        name, m = labels[key], med[key]
        rate = fl["total"] / m
        roof.append(
            [
                name,
                _rate(fl["total"], m),
                f"{rate / (fl['encoder'] / t_mm):.0%}",
                f"{m / t_mm:.2f}",
            ]
        )
    lines += [
        "",
        *_table(
            ["implementation", "step FLOPs / step time", "of its dtype's x @ W rate", "step ÷ x @ W"], roof
        ),
        "(the dense count assumes a dense encoder backward; saelab's and sparsify's are sparse, so a step can "
        "pass 100%. The encoder forward is the one dense product a step must do: step ÷ x @ W ≥ 1 for a step that "
        "does it in its own dtype; the screened step does it in bf16)",
    ]
    if device.startswith("cpu") and hasattr(os, "getloadavg"):
        lines.append(
            f"(machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
        )
    return lines
