"""Training-step cost of OrtSAE and Matryoshka against BatchTopK + AuxK, in one process.

Every variant is a BatchTopK SAE (Bussmann et al. 2024, arXiv:2412.06410) trained as `LitSAE` trains it:
forward, objective, backward, parallel-gradient removal, Adam step, decoder renormalisation.

* batchtopk    L = MSE + α·AuxK, α = 1/32, k_aux = 256 (conf/objective/terms/auxk.yaml): the baseline
* ortsae/1     L + γ·L_orth (OrtSAE, Korznikov et al. 2025, arXiv:2509.22033), γ = 0.25, chunk size
               8192 (the paper's K(m) = ⌈m/8192⌉ chunks), every step
* ortsae/5     the same, computed on every 5th step only: the paper's cheap variant (γ×5 on those
               steps, which `Ortho` applies itself, so `coeff` stays γ), the configuration experiments use
* matryoshka   mean over the nested prefixes [1/16, 1/16, 1/8, 1/4, 1/2] of d_sae of the prefix MSE
               (Bussmann et al. 2025, arXiv:2503.17547) + α·AuxK

AuxK sees a fixed random dead set (`--dead-frac` of the latents), so it does its work every step as it
does in a run with dead latents. Steps are timed in rounds of 5 per variant (one full ortsae/5 cycle),
the variants taking turns after every step, in a rotating order, after a warm-up; each variant's ratio is
the median over rounds of its round time over BatchTopK's in the same round, which cancels most load from other
processes. The paper's Table 3 reports 1.15× (Matryoshka) and 1.04–1.11× (OrtSAE) on one H100.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from dataclasses import dataclass

import torch

from saelab.allocator import keep_freed_memory
from saelab.bench.topk import LR, SaelabRunner, Size, _table, make_batches, time_interleaved
from saelab.objectives import MSE, AuxK, Matryoshka, Objective, Ortho
from saelab.objectives.terms import Term, fast_bf16
from saelab.sae import BatchTopK

FULL = Size(576, 16384, 32, 4096)
QUICK = Size(64, 1024, 8, 256)
BLOCK = 5  # steps per timing sample: one full cycle of ortsae/5
GAMMA, ALPHA, K_AUX = 0.25, 1 / 32, 256
CHUNK = 8192  # Ortho splits d_sae into ⌈d_sae / CHUNK⌉ equal chunks: the paper's K(m) = ⌈m/8192⌉
MATRYOSHKA_GROUPS = [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2]


@dataclass(frozen=True)
class Variant:
    name: str
    terms: dict[str, Term]
    target: float | None  # the step-time ratio to BatchTopK it must stay under


def variants() -> list[Variant]:
    def auxk() -> AuxK:
        return AuxK(coeff=ALPHA, k_aux=K_AUX)

    return [
        Variant("batchtopk", {"mse": MSE(), "auxk": auxk()}, None),
        Variant(
            "ortsae/1", {"mse": MSE(), "auxk": auxk(), "ortho": Ortho(GAMMA, CHUNK, every_n_steps=1)}, None
        ),
        Variant(
            "ortsae/5", {"mse": MSE(), "auxk": auxk(), "ortho": Ortho(GAMMA, CHUNK, every_n_steps=5)}, 1.1
        ),
        Variant(
            "matryoshka", {"matryoshka": Matryoshka(group_fractions=MATRYOSHKA_GROUPS), "auxk": auxk()}, 1.2
        ),
    ]


def dead_set(d_sae: int, frac: float, seed: int = 0) -> torch.Tensor:
    """A fixed random set of `frac`·d_sae latents that AuxK treats as dead."""
    mask = torch.zeros(d_sae, dtype=torch.bool)
    n = round(frac * d_sae)
    mask[torch.randperm(d_sae, generator=torch.Generator().manual_seed(seed))[:n]] = True
    return mask


def _paired_ratio(t: list[float], base: list[float]) -> float:
    """Median over rounds of the ratio of two runners' times in the same round."""
    return statistics.median(a / b for a, b in zip(t, base, strict=True))


def main(args: argparse.Namespace) -> list[str]:
    device = str(getattr(args, "device", None) or "cpu")
    quick = bool(getattr(args, "quick", False))
    size = (QUICK if quick else FULL).with_args(args)
    dtype = str(getattr(args, "dtype", None) or "float32")
    dead_frac = getattr(args, "dead_frac", None)
    dead_frac = 0.05 if dead_frac is None else float(dead_frac)
    steps = getattr(args, "steps", None) or (10 if quick else 30)
    rounds = math.ceil(steps / BLOCK)  # timed steps per variant, rounded up to whole blocks
    torch.manual_seed(0)

    vs = variants()
    dead = dead_set(size.d_sae, dead_frac)
    runners = [
        SaelabRunner(
            size,
            device,
            seed=0,
            activation=BatchTopK(size.k),
            objective=Objective(v.terms),
            dead_mask=dead,
            dtype=dtype,
        )
        for v in vs
    ]
    batches = make_batches(size, 4, device, seed=0)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu: list[list[float]] = []
    times = time_interleaved(
        runners, batches, warmup=BLOCK, steps=rounds, device=device, block=BLOCK, cpu_times=cpu
    )
    del runners, batches

    gram = "bf16" if fast_bf16(torch.device(device)) else "fp32"
    where = f"{torch.get_num_threads()} threads" if device.startswith("cpu") else torch.cuda.get_device_name()
    lines = [
        f"BatchTopK SAE training step by variant, {size}, {dtype}, {device} ({where}), torch {torch.__version__}",
        f"Adam lr={LR}, unit-norm decoder + parallel-grad removal; AuxK α={ALPHA:.4g}, k_aux={K_AUX}, "
        f"{int(dead.sum())} dead latents ({dead_frac:.0%}); ortho γ={GAMMA}, chunk {CHUNK} "
        f"(K={math.ceil(size.d_sae / CHUNK)}), Gram in {gram}"
        + (" (argmax confirmed in fp32)" if gram == "bf16" else "")
        + f"; freed memory kept in the heap: {'yes' if keep_freed_memory() else 'no (glibc default)'}",
    ]
    on_cpu = device.startswith("cpu")
    rows = []
    for v, t, c in zip(vs, times, cpu, strict=True):
        ratio = _paired_ratio(t, times[0])
        target = "" if v.target is None else f"≤ {v.target:.2f}× " + ("ok" if ratio <= v.target else "MISSED")
        row = [v.name, f"{ratio:.3f}×"]
        if on_cpu:
            row.append(f"{_paired_ratio(c, cpu[0]):.3f}×")
        row += [target, f"{statistics.median(t) * 1e3:.0f}", f"{min(t) * 1e3:.0f}"]
        rows.append(row)
    headers = ["variant", "step time / batchtopk", *(["cpu time / batchtopk"] if on_cpu else [])]
    headers += ["target", "median ms/step", "min ms/step"]
    lines += ["", *_table(headers, rows), ""]
    lines.append(
        f"({rounds} rounds of {BLOCK} steps per variant, taking turns step by step, after {BLOCK} warm-up steps; ratio = median "
        "over rounds of the paired block-time ratio (wall clock; the target applies to it); the ms/step hold "
        "for this session only)"
    )
    if on_cpu:
        lines.append(
            "(cpu time: this process's CPU seconds over the same blocks, less disturbed by other processes "
            "than wall time)"
        )
    if on_cpu and load0 is not None:
        lines.append(
            f"(machine load average (1 min) at the start / end of the timing: {load0:.1f} / "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
        )
    return lines
