"""Dictionary-geometry evaluators: they read only decoder rows, so they apply to every source.

- `geometry`: MeanCosSim and the clustering coefficient of the decoder-similarity graph (OrtSAE),
- `composition`: how well a small meta-SAE rebuilds the decoder from a few shared atoms (SAEBench
  meta_structure, OrtSAE §2.3),
- `unique_features`: the share of latents with no counterpart in another SAE (OrtSAE).

All of them compare unit-normalised decoder rows d_i = W_dec,i / ‖W_dec,i‖ and work through the
[m, m] Gram in row blocks, so an m = 16384 dictionary never holds more than a 64 MiB slice of it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from jaxtyping import Float
from torch import Tensor

from saelab.analysis import plots
from saelab.eval.base import EvalResult, Table, fired_counts
from saelab.eval.metrics import FVU, L0, DeadFraction
from saelab.io import load_sae
from saelab.objectives import MSE, AuxK, Objective
from saelab.sae import SAE, BatchTopK
from saelab.types import SAELike

_LOCAL = {"sync_on_compute": False}  # evaluation runs in one process, also after a DDP fit
_GRAM_BLOCK = 2**24  # entries of the Gram held at once: 64 MiB of float32
_DENSE_MAX = 2**30  # adjacency entries a dense triangle count may hold (4 GiB of float32, m ≤ 32768)
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def unit_rows(W: Float[Tensor, "m d"]) -> Float[Tensor, "m d"]:
    """Rows scaled to unit norm, in float32 (a zero row stays zero, so its cosines are 0)."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _rows_per_block(m: int) -> int:
    return max(1, _GRAM_BLOCK // max(m, 1))


def threshold_key(tau: float) -> str:
    """The metric key of a threshold: 0.3 → `clustering_t0p3` (W&B keys allow only [A-Za-z0-9_])."""
    return "clustering_t" + f"{tau:g}".replace(".", "p").replace("-", "m")


# ---------------------------------------------------------------------------------------------- geometry
def decoder_graphs(
    W_dec: Float[Tensor, "m d_in"], thresholds: Sequence[float], block_rows: int | None = None
) -> tuple[Float[Tensor, " m"], list[tuple[np.ndarray, np.ndarray]]]:
    """One pass over the decoder's cosine Gram: each row's max cosine to another row, and the edges
    {i < j : cos(d_i, d_j) > τ} of the similarity graph at every threshold τ (as int32 arrays i, j).

    The Gram is computed `block_rows` rows at a time and only the upper triangle is kept, so every edge
    is decided by one float (cos(d_i, d_j) and cos(d_j, d_i) may round differently in two blocks).
    """
    Wn = unit_rows(W_dec)
    m = Wn.shape[0]
    taus = [float(t) for t in thresholds]
    lo = min(taus) if taus else math.inf
    b = block_rows or _rows_per_block(m)
    max_cos = torch.full((m,), math.nan, device=Wn.device)
    parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in taus]
    for s in range(0, m, b):
        e = min(s + b, m)
        G = Wn[s:e] @ Wn.t()  # (b, m): cosines of rows s..e to every row
        local = torch.arange(e - s, device=Wn.device)
        G[local, local + s] = -math.inf  # no self-loops
        if m > 1:
            max_cos[s:e] = G.max(dim=1).values
        if not taus:
            continue
        r, c = (G > lo).nonzero(as_tuple=True)  # row-major, so edges stay sorted by i
        upper = c > r + s
        r, c = r[upper], c[upper]
        vals = G[r, c]
        for t, tau in enumerate(taus):  # thresholds are nested: filter the loosest graph's edges
            keep = vals > tau
            parts[t].append(((r[keep] + s).to(torch.int32).cpu(), c[keep].to(torch.int32).cpu()))
    edges = []
    for p in parts:
        i = torch.cat([a for a, _ in p]).numpy() if p else np.zeros(0, np.int32)
        j = torch.cat([c for _, c in p]).numpy() if p else np.zeros(0, np.int32)
        edges.append((i, j))
    return max_cos, edges


def count_triangles(
    i: np.ndarray, j: np.ndarray, m: int, method: str = "auto", device: torch.device | str = "cpu"
) -> int:
    """Triangles of the undirected simple graph on m vertices with edges (i[e], j[e]), i < j.

    "sparse": orient each edge from the lower-degree end to the higher (ties by index) and count
    T = Σ ((U U) ⊙ U) with scipy, rows in blocks; work Σ_v in(v)·out(v) ≤ O(E^1.5).
    "dense": U = the upper-triangular 0/1 adjacency as float32 (exact for counts < 2^24) and
    T = Σ_blocks ((U[B, s:] U[s:, s:]) ⊙ U[B, s:]), about m³/3 multiply-adds, on `device`.
    "auto" takes the cheaper by a cost model measured on 2 CPU cores (dense ≈ 300× faster per
    operation on CPU, ≈ 1000× more on a GPU) when the dense adjacency fits in 4 GiB.
    """
    if method not in ("auto", "sparse", "dense"):
        raise ValueError(f"count_triangles method must be auto, sparse or dense, got {method!r}.")
    if len(i) == 0 or m < 3:
        return 0
    i64, j64 = i.astype(np.int64), j.astype(np.int64)
    deg = np.bincount(i64, minlength=m) + np.bincount(j64, minlength=m)
    rank = np.empty(m, np.int64)
    rank[np.argsort(deg, kind="stable")] = np.arange(m)
    swap = rank[i64] > rank[j64]
    a, c = np.where(swap, j64, i64), np.where(swap, i64, j64)  # edge a → c with rank(a) < rank(c)
    if method == "auto":
        work = float((np.bincount(a, minlength=m) * np.bincount(c, minlength=m)).sum())
        speedup = 3e2 if torch.device(device).type == "cpu" else 3e5
        fits = m * m <= _DENSE_MAX
        method = "dense" if fits and work * speedup > m**3 / 3 else "sparse"
    b = _rows_per_block(m)
    if method == "dense":
        dev = torch.device(device)
        U = torch.zeros(m, m, device=dev)
        U[torch.from_numpy(i64).to(dev), torch.from_numpy(j64).to(dev)] = 1.0
        tri = 0.0
        for s in range(0, m, b):
            Ub = U[s : s + b, s:]  # (b, m - s): U is strictly upper triangular, columns < s are zero
            tri += float(((Ub @ U[s:, s:]) * Ub).sum(dtype=torch.float64))
        return int(round(tri))
    U = sp.csr_matrix((np.ones(len(a), np.int64), (a, c)), shape=(m, m))
    total = 0
    for s in range(0, m, b):
        B = U[s : s + b]
        total += int((B @ U).multiply(B).sum())
    return total


def clustering_coefficients(
    W_dec: Float[Tensor, "m d_in"],
    thresholds: Sequence[float] = THRESHOLDS,
    method: str = "auto",
    block_rows: int | None = None,
) -> list[dict[str, float]]:
    """Global clustering coefficient (transitivity) of the decoder-similarity graph at each threshold.

    Edges are {i, j} with cos(d_i, d_j) > τ (OrtSAE, arXiv:2509.22033, §2.3):

        C(τ) = 3·#triangles / #connected triples,   #connected triples = Σ_i deg_i (deg_i − 1) / 2

    and C = 0 when the graph has no connected triple (networkx `transitivity`). Returns one
    {threshold, edges, triangles, triples, coefficient} per threshold.
    """
    _, edges = decoder_graphs(W_dec, thresholds, block_rows)
    return [
        _transitivity(float(t), i, j, W_dec.shape[0], method, W_dec.device)
        for t, (i, j) in zip(thresholds, edges)
    ]


def _transitivity(tau: float, i: np.ndarray, j: np.ndarray, m: int, method: str, device) -> dict[str, float]:
    deg = np.bincount(i, minlength=m).astype(np.int64) + np.bincount(j, minlength=m)
    triples = int((deg * (deg - 1) // 2).sum())
    tri = count_triangles(i, j, m, method, device)
    return {
        "threshold": tau,
        "edges": int(len(i)),
        "triangles": tri,
        "triples": triples,
        "coefficient": 3 * tri / triples if triples else 0.0,
    }


class Geometry:
    """Decoder geometry: MeanCosSim and the clustering coefficient of the similarity graph (OrtSAE).

    - `mean_max_cos` = (1/m) Σ_i max_{j≠i} cos(d_i, d_j) (MeanCosSim, OrtSAE arXiv:2509.22033);
    - `clustering_t<τ>` (τ with "p" for the point: `clustering_t0p3` is τ = 0.3) = 3·#triangles /
      #connected triples of the graph with edges cos(d_i, d_j) > τ, for each τ in `thresholds`
      (see `clustering_coefficients`; the paper reports it over 10 thresholds).

    `data["max_cos"]` holds each latent's max cosine, `data["max_cos_hist"]` its histogram on fixed
    edges over [−1, 1] (so histograms of several SAEs overlay bin for bin; `max_cos_overlay` draws
    them), `data["clustering"]` the {threshold, edges, triangles, triples, coefficient} records.
    Writes `decoder_cos.png`. Cost: one pass over the Gram (m²·d_in multiply-adds) plus a triangle
    count per threshold; m = 4096 takes about a second on 2 CPU cores, m = 16384 with d_in = 576
    about 20 s (graphs with a fifth of all pairs as edges cost minutes at that size).

    Args:
        thresholds: cosine thresholds τ of the similarity graph.
        bins: histogram bins over [−1, 1].
        plot: write decoder_cos.png.
    """

    name = "geometry"
    needs = ()

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS, bins: int = 100, plot: bool = True) -> None:
        self.thresholds = [float(t) for t in thresholds]
        self.bins, self.plot = int(bins), bool(plot)

    @torch.no_grad()
    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        m = sae.W_dec.shape[0]
        max_cos, edges = decoder_graphs(sae.W_dec, self.thresholds)
        records = [
            _transitivity(t, i, j, m, "auto", sae.W_dec.device) for t, (i, j) in zip(self.thresholds, edges)
        ]
        mc = max_cos.double().cpu()
        metrics = {"mean_max_cos": float(mc.mean())}
        metrics |= {threshold_key(r["threshold"]): float(r["coefficient"]) for r in records}
        finite = mc[torch.isfinite(mc)].clamp(-1.0, 1.0).numpy()
        bin_edges = np.linspace(-1.0, 1.0, self.bins + 1)
        counts, _ = np.histogram(finite, bins=bin_edges)
        res = EvalResult(
            metrics=metrics,
            tables={
                "decoder clustering": Table(
                    ["threshold", "edges", "triangles", "connected triples", "clustering"],
                    [
                        [r["threshold"], r["edges"], r["triangles"], r["triples"], r["coefficient"]]
                        for r in records
                    ],
                )
            },
            data={
                "max_cos": mc.tolist(),
                "max_cos_hist": {"edges": bin_edges.tolist(), "counts": counts.tolist()},
                "clustering": records,
            },
            objects={"max_cos": mc.float()},
        )
        if self.plot and finite.size:
            res.figures["decoder max cosine"] = plots.histogram(
                finite,
                Path(out_dir) / "decoder_cos.png",
                xlabel="max cosine to another latent",
                title=f"Decoder max cosine (mean {metrics['mean_max_cos']:.3f})",
                bins=50,
            )
        return res


def max_cos_overlay(results: Mapping[str, EvalResult], path: Path, bins: int = 50) -> Path:
    """One figure with the max-cosine histograms of several SAEs ({name: its geometry EvalResult})."""
    series = {name: r.data["max_cos"] for name, r in results.items()}
    return plots.overlaid_histograms(
        series, path, xlabel="max cosine to another latent", title="Decoder max cosine", bins=bins
    )


# ------------------------------------------------------------------------------------------- composition
@contextlib.contextmanager
def _quiet_single_process_fit() -> Iterator[None]:
    """Silence Lightning's banner lines and hints, and make the fit single-process.

    After a DDP fit the process group stays up on rank 0, which evaluates alone; LitSAE (and Lightning)
    would then run collectives that no other rank joins. The meta-SAE is a one-process fit, so
    `torch.distributed.is_initialized()` reads False for its duration.
    """
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), mock.patch("torch.distributed.is_initialized", return_value=False):
            warnings.simplefilter("ignore")  # "few dataloader workers", "no val loop": by design here
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class Composition:
    """Composition rate: the explained variance of the decoder under a small BatchTopK meta-SAE.

    SAEBench meta_structure / OrtSAE arXiv:2509.22033 §2.3: a BatchTopK SAE (Bussmann et al. 2024,
    arXiv:2412.06410) of width ⌈width_ratio · d_sae⌉ (at least k) and k = 4 is trained on the SAE's
    unit-normalised decoder rows {d_i}, and

        composition = 1 − FVU = 1 − Σ_i ‖d_i − d̂_i‖² / Σ_i ‖d_i − d̄‖²

    (FVU as in `saelab.eval.metrics.FVU`); higher means latents are sums of a few shared atoms, lower
    means a more atomic dictionary. Scoring selects by batch top-k over blocks of `eval_batch_size` rows,
    as SAEBench scores its meta-SAE. The meta-SAE is trained by saelab's `LitSAE` on mse + auxk (a
    Lightning fit on the CPU: no logger, checkpoints or progress bar, seeded; the caller's RNG state is
    restored afterwards). `meta_l0` is its mean L0 on the decoder rows, `meta_dead_frac` the share of
    meta latents that fire on no row. `objects["meta_sae"]` keeps the trained meta-SAE.

    Cost: `steps` · batch · d_in · width multiply-adds, about 3× that with the backward and the auxk
    term. With the defaults, d_sae = 2048 and d_in = 576 (meta width 512) take 3–5 s on 2 CPU cores
    (8–12 s while other jobs load the same cores); the time grows with d_in · d_sae. SAEBench trains
    for 1500 steps of 1024 rows at lr 5e-4; raise `steps` for large dictionaries.

    Args:
        lit: the training module class, `saelab.lit.LitSAE` (passed in because saelab.lit imports
            saelab.eval, and packages never import each other in a cycle).
        width_ratio: meta-SAE width as a fraction of d_sae (SAEBench 0.25).
        k: meta-SAE BatchTopK k (SAEBench 4).
        steps: optimiser steps.
        lr: Adam learning rate.
        batch_size: decoder rows per step (at most d_sae).
        seed: seed of the meta-SAE's initialisation and of the row order.
        eval_batch_size: rows per batch top-k selection when scoring (SAEBench 4096).
        num_threads: CPU threads for the fit (restored afterwards); None: one thread when a step has at
            most 2^27 multiply-adds (batch · d_in · width; d_sae = 2048, d_in = 576 is below), where
            thread synchronisation costs more than it saves, else torch's current setting.
    """

    name = "composition"
    needs = ()

    def __init__(
        self,
        *,
        lit: Callable[..., pl.LightningModule],
        width_ratio: float = 0.25,
        k: int = 4,
        steps: int = 200,
        lr: float = 2e-3,
        batch_size: int = 256,
        seed: int = 0,
        eval_batch_size: int = 4096,
        num_threads: int | None = None,
    ) -> None:
        if not 0 < width_ratio:
            raise ValueError(f"composition width_ratio must be positive, got {width_ratio}.")
        if k < 1 or steps < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("composition needs k, steps, batch_size and eval_batch_size >= 1.")
        self.lit = lit
        self.width_ratio, self.k, self.steps = float(width_ratio), int(k), int(steps)
        self.lr, self.batch_size, self.seed = float(lr), int(batch_size), int(seed)
        self.eval_batch_size = int(eval_batch_size)
        self.num_threads = int(num_threads) if num_threads else None

    def fit(self, rows: Float[Tensor, "m d_in"], out_dir: Path | None = None) -> SAE:
        """Train the meta-SAE on `rows` (unit-norm decoder rows, on the CPU) and return it."""
        m, d_in = rows.shape
        width = max(self.k, math.ceil(m * self.width_ratio))
        batch = min(self.batch_size, m)
        meta = SAE(d_in, width, BatchTopK(self.k), seed=self.seed)
        objective = Objective({"mse": MSE(), "auxk": AuxK(k_aux=max(1, d_in // 2))})
        module = self.lit(
            sae=meta,
            objective=objective,
            optimizer=functools.partial(torch.optim.Adam, lr=self.lr),
            # dead: fired on none of the rows of two passes over the dictionary
            dead_window_tokens=2 * m,
            seed=self.seed,
            log_every=self.steps,
        )
        g = torch.Generator().manual_seed(self.seed)
        data = torch.utils.data
        # whole batches are fetched by one index (batch_size=None), not row by row and collated
        order = data.BatchSampler(data.RandomSampler(range(m), generator=g), batch, drop_last=True)
        loader = data.DataLoader(data.TensorDataset(rows), sampler=order, batch_size=None)
        threads = torch.get_num_threads()
        small = batch * d_in * width <= 2**27  # a step this small loses more to thread sync than it gains
        with torch.random.fork_rng(devices=[]), _quiet_single_process_fit():
            torch.manual_seed(self.seed)
            torch.set_num_threads(self.num_threads or (1 if small else threads))
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=self.steps,
                max_epochs=-1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                default_root_dir=str(out_dir) if out_dir is not None else None,
            )
            try:
                trainer.fit(module, train_dataloaders=loader)
            finally:
                torch.set_num_threads(threads)
        return meta

    @torch.no_grad()
    def score(self, meta: SAE, rows: Float[Tensor, "m d_in"]) -> dict[str, float]:
        """composition (1 − FVU), meta_l0 and meta_dead_frac of `meta` on `rows`."""
        fvu, l0, dead = FVU(rows.shape[1], **_LOCAL), L0(**_LOCAL), DeadFraction(meta.d_sae, **_LOCAL)
        was_training = meta.training
        meta.train()  # batch top-k selection (the threshold it moves is not used afterwards)
        try:
            for x in rows.split(self.eval_batch_size):
                out = meta(x)
                fvu.update(out.x, out.x_hat)
                l0.update(out.l0)
                dead.update(fired_counts(out, meta.d_sae), x.shape[0])
        finally:
            meta.train(was_training)
        return {
            "composition": 1 - float(fvu.compute()),
            "meta_l0": float(l0.compute()),
            "meta_dead_frac": float(dead.compute()),
        }

    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        t0 = time.perf_counter()
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
        ):  # a caller's no-grad mode must not reach the fit
            rows = unit_rows(sae.W_dec).cpu().clone()
            meta = self.fit(rows, out_dir)
        seconds = time.perf_counter() - t0
        meta.eval()
        metrics = self.score(meta, rows)
        data = {
            "width": meta.d_sae,
            "k": self.k,
            "steps": self.steps,
            "batch_size": min(self.batch_size, rows.shape[0]),
            "lr": self.lr,
            "seed": self.seed,
            "seconds": seconds,
            **metrics,
        }
        return EvalResult(metrics=metrics, data={"composition": data}, objects={"meta_sae": meta})


# --------------------------------------------------------------------------------------- unique features
@torch.no_grad()
def unique_features(
    W_a: Float[Tensor, "m_a d_in"],
    W_b: Float[Tensor, "m_b d_in"],
    threshold: float = 0.2,
    block_rows: int | None = None,
) -> dict[str, Any]:
    """Unique features of two dictionaries of the same activation site (OrtSAE, arXiv:2509.22033).

    A latent i of A is unique with respect to B when max_j cos(a_i, b_j) < threshold (0.2 in the
    paper); likewise for B with respect to A. Cosines are signed, so a direction and its negation are
    not counterparts. Returns `unique_a` / `unique_b` (shares), `n_unique_a` / `n_unique_b` (counts),
    `n_a`, `n_b`, `threshold`, and each latent's best cosine `max_cos_a` [m_a], `max_cos_b` [m_b].
    One pass over A·Bᵀ in row blocks.
    """
    if W_a.shape[1] != W_b.shape[1]:
        raise ValueError(
            f"unique features need dictionaries of the same width: A has d_in={W_a.shape[1]}, "
            f"B has d_in={W_b.shape[1]}; unique features compare dictionaries of the same activation site."
        )
    A = unit_rows(W_a)
    B = unit_rows(W_b).to(A.device)
    m_a, m_b = A.shape[0], B.shape[0]
    best_a = torch.full((m_a,), -math.inf, device=A.device)
    best_b = torch.full((m_b,), -math.inf, device=A.device)
    b = block_rows or _rows_per_block(m_b)
    for s in range(0, m_a, b):
        S = A[s : s + b] @ B.t()  # (b, m_b)
        if m_b:
            best_a[s : s + b] = S.max(dim=1).values
        if S.shape[0]:
            best_b = torch.maximum(best_b, S.max(dim=0).values)
    n_ua, n_ub = int((best_a < threshold).sum()), int((best_b < threshold).sum())
    return {
        "threshold": float(threshold),
        "n_a": m_a,
        "n_b": m_b,
        "n_unique_a": n_ua,
        "n_unique_b": n_ub,
        "unique_a": n_ua / max(m_a, 1),
        "unique_b": n_ub / max(m_b, 1),
        "max_cos_a": best_a.cpu(),
        "max_cos_b": best_b.cpu(),
    }


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", str(name))


class UniqueFeatures:
    """Unique features against other SAEs of the same site (OrtSAE, arXiv:2509.22033).

    A latent is unique with respect to another SAE when its max cosine to every latent of that SAE is
    below `threshold` (see `unique_features`). For each entry `name` of `against`:

    - `unique_vs_<name>`: share of *this* SAE's latents that are unique with respect to <name>;
    - `unique_of_<name>`: share of <name>'s latents that are unique with respect to this SAE.

    (The paper's "+9% distinct features" for OrtSAE vs BatchTopK is `unique_vs_batchtopk` of the OrtSAE.)
    Counts are in the table and in `data["unique_features"][name]`.

    Args:
        against: {name: SAELens export directory (read by `saelab.io.load_sae` when evaluated), an SAE
            module, or a [d_sae, d_in] decoder tensor}; names with other characters than
            [A-Za-z0-9_] have them replaced by "_" in metric keys.
        threshold: max cosine below which a latent is unique (0.2 in the paper).
    """

    name = "unique_features"
    needs = ()

    def __init__(self, against: Mapping[str, Any] | None = None, threshold: float = 0.2) -> None:
        self.against = dict(against or {})
        self.threshold = float(threshold)

    @staticmethod
    def _decoder(other: Any) -> Tensor:
        if isinstance(other, (str, Path)):
            return load_sae(other).W_dec
        if isinstance(other, Tensor):
            return other
        if hasattr(other, "W_dec"):
            return other.W_dec
        raise TypeError(
            f"unique_features.against values are export directories, SAEs or decoder tensors, got {type(other).__name__}."
        )

    @torch.no_grad()
    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        res = EvalResult()
        rows, records = [], {}
        for name, other in self.against.items():
            W_b = self._decoder(other)
            if W_b.shape[1] != sae.W_dec.shape[1]:
                raise ValueError(
                    f"unique_features: this SAE has d_in={sae.W_dec.shape[1]} and {name!r} has "
                    f"d_in={W_b.shape[1]}; unique features compare dictionaries of the same activation site."
                )
            r = unique_features(sae.W_dec, W_b, self.threshold)
            key = _metric_name(name)
            res.metrics[f"unique_vs_{key}"] = r["unique_a"]
            res.metrics[f"unique_of_{key}"] = r["unique_b"]
            records[str(name)] = {k: v for k, v in r.items() if not k.startswith("max_cos")}
            rows.append(
                [
                    str(name),
                    r["n_a"],
                    r["n_unique_a"],
                    r["unique_a"],
                    r["n_b"],
                    r["n_unique_b"],
                    r["unique_b"],
                ]
            )
        if rows:
            res.tables["unique features"] = Table(
                [
                    "against",
                    "latents",
                    "unique here",
                    "share",
                    "their latents",
                    "unique there",
                    "their share",
                ],
                rows,
            )
            res.data["unique_features"] = {"threshold": self.threshold, **records}
        return res
