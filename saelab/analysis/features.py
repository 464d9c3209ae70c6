"""Feature records: per latent, its firing density, activation histogram, top and quantile-sampled contexts.

One streamed pass over a split of a text source (`collect_feature_records`) keeps, per latent j:

- `count[j]`: positions with f_j > 0, over `n_tokens` positions seen, so density_j = count_j / n_tokens;
  `act_sum[j]` = Σ f_j over those positions (mean activation when firing = act_sum_j / count_j);
- `hist[j]`: the firing activations binned on fixed log-spaced edges, 10**linspace(lo, hi, n_bins + 1)
  (`log10_range`); values below the first edge count in bin 0, above the last in the last bin. Fixed
  edges make the histogram a plain sum over batches, so it streams and two collections add up;
- the `top_k` positions with the largest f_j (ties broken by storage order);
- a uniform sample of `reservoir` firing positions (each gets a random key, the largest keys are kept:
  bottom-k / priority sampling, which merges batch by batch like the top-k does). At the end the sample is
  sorted by activation, cut into `n_quantiles` equal-count bins and `per_quantile` positions are drawn from
  each: the quantile sampling of delphi (Paulo et al. 2024, "Automatically Interpreting Millions of
  Features in LLMs", arXiv:2410.13928, `split_quantiles`), applied to an unbiased sample of the firing
  positions instead of to all of them, so nothing grows with the token budget.

Both selections are [d_sae, m] tables; the non-zero codes of recent batches that beat a latent's m-th
entry are buffered and folded in by one sort (`_Largest`), never through a [tokens, d_sae] matrix (a dense
SAE's codes are dense for one batch only). Memory is O(d_sae · (top_k + reservoir + n_bins)).

Contexts are windows of (left, right) positions around the selected one, inside its document: harvested
rows are the packed token stream in order (BOS and padding dropped), so the window is the neighbouring rows
whose `doc_id` matches and whose `doc_pos` is contiguous; positions outside the document are −1 / 0. The
window's per-token activations of that latent come from a second read of only the rows inside windows,
re-encoded by the SAE (from the activation cache, or by running the host on just the contexts holding
them). Activations are in host units: the SAE sees s·x (s = the source's `act_scale`) and its codes are
divided by s, as in `TextActivations.per_document`.

On disk (`FeatureRecords.save(run_dir)` → `run_dir/features/`): `records.safetensors` (every array
below), `latents.jsonl` (one JSON object per latent, token ids and optionally decoded tokens) and
`meta.json` (sizes, settings and the safetensors sha256), written atomically.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from saelab.files import atomic_dir, load_safetensors, read_json, save_safetensors

FOLDER = "features"
FORMAT_VERSION = 1
HOW_TO_MAKE = (
    "collect them first with `saelab.analysis.features.collect_feature_records(sae, source)` and "
    "save them with `.save(run_dir)`."
)


@dataclass(frozen=True)
class Context:
    """One selected position of a latent and its window in the document."""

    doc: int  # index of the text in the corpus
    pos: int  # token position in that text
    act: float  # the latent's activation at `pos` (host units)
    tokens: list[int]  # window token ids, −1 outside the document
    acts: list[float]  # the latent's activation at each window token
    quantile: int | None = None  # activation-quantile bin of a sampled context (0 = lowest)


@dataclass(frozen=True)
class LatentRecord:
    latent: int
    count: int
    density: float
    mean_act: float  # mean activation when firing
    hist: list[int]
    top: list[Context]
    samples: list[Context]


@dataclass
class FeatureRecords:
    """Per-latent records of one SAE over `n_tokens` positions of a split (see the module docstring).

    Contexts are stored as [d_sae, m] tensors (m = top_k or the sample size), sorted by activation
    (descending for `top_*`, samples by quantile bin); an empty slot has row −1 and activation 0.
    """

    n_tokens: int
    window: tuple[int, int]  # (left, right) tokens around the selected position
    log10_range: tuple[float, float]
    count: Int[Tensor, " d_sae"]
    act_sum: Float[Tensor, " d_sae"]
    hist: Int[Tensor, "d_sae n_bins"]
    top_act: Float[Tensor, "d_sae k"]
    top_row: Int[Tensor, "d_sae k"]  # storage row in the split
    top_doc: Int[Tensor, "d_sae k"]
    top_pos: Int[Tensor, "d_sae k"]
    top_tokens: Int[Tensor, "d_sae k w"]
    top_window_acts: Float[Tensor, "d_sae k w"]
    sample_act: Float[Tensor, "d_sae s"]
    sample_row: Int[Tensor, "d_sae s"]
    sample_doc: Int[Tensor, "d_sae s"]
    sample_pos: Int[Tensor, "d_sae s"]
    sample_quantile: Int[Tensor, "d_sae s"]
    sample_tokens: Int[Tensor, "d_sae s w"]
    sample_window_acts: Float[Tensor, "d_sae s w"]
    meta: dict[str, Any] = field(default_factory=dict)  # split, source key, act_scale, settings

    _ARRAYS = (
        "count act_sum hist top_act top_row top_doc top_pos top_tokens top_window_acts sample_act "
        "sample_row sample_doc sample_pos sample_quantile sample_tokens sample_window_acts"
    ).split()

    @property
    def d_sae(self) -> int:
        return int(self.count.shape[0])

    @property
    def density(self) -> Float[Tensor, " d_sae"]:
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def hist_edges(self) -> Float[Tensor, " n_bins_plus_1"]:
        lo, hi = self.log10_range
        return 10 ** torch.linspace(lo, hi, self.hist.shape[1] + 1, dtype=torch.float64)

    def latent(self, i: int) -> LatentRecord:
        """Everything recorded about latent `i`."""
        i = int(i)
        if not 0 <= i < self.d_sae:
            raise IndexError(
                f"latent {i} is out of range: this SAE has {self.d_sae} latents (0–{self.d_sae - 1})."
            )
        n = int(self.count[i])

        def contexts(prefix: str, quantiles: Tensor | None) -> list[Context]:
            row, act = getattr(self, f"{prefix}_row")[i], getattr(self, f"{prefix}_act")[i]
            doc, pos = getattr(self, f"{prefix}_doc")[i], getattr(self, f"{prefix}_pos")[i]
            toks, wacts = getattr(self, f"{prefix}_tokens")[i], getattr(self, f"{prefix}_window_acts")[i]
            return [
                Context(
                    int(doc[s]),
                    int(pos[s]),
                    float(act[s]),
                    toks[s].tolist(),
                    wacts[s].tolist(),
                    None if quantiles is None else int(quantiles[s]),
                )
                for s in range(row.shape[0])
                if row[s] >= 0
            ]

        return LatentRecord(
            latent=i,
            count=n,
            density=n / max(self.n_tokens, 1),
            mean_act=float(self.act_sum[i]) / n if n else 0.0,
            hist=self.hist[i].tolist(),
            top=contexts("top", None),
            samples=contexts("sample", self.sample_quantile[i]),
        )

    # ------------------------------------------------------------------ files
    def save(self, run_dir: str | Path, decode: Callable[[int], str] | None = None) -> Path:
        """Write `run_dir/features/` atomically; `decode` (token id → text) adds the window strings to the JSONL."""
        target = Path(run_dir) / FOLDER
        if decode is not None:
            decode = functools.cache(decode)  # each token id is decoded once
        with atomic_dir(target) as tmp:
            sha = save_safetensors(
                {k: getattr(self, k).contiguous() for k in self._ARRAYS}, tmp / "records.safetensors"
            )
            with open(tmp / "latents.jsonl", "w", encoding="utf-8") as f:
                for i in range(self.d_sae):
                    f.write(json.dumps(_jsonl_record(self.latent(i), decode)) + "\n")
            meta = {
                "format": FORMAT_VERSION,
                "d_sae": self.d_sae,
                "n_tokens": self.n_tokens,
                "window": list(self.window),
                "log10_range": list(self.log10_range),
                "sha256": sha,
                **self.meta,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, run_dir: str | Path) -> FeatureRecords:
        """The records saved under `run_dir` (a run dir or its `features/` folder)."""
        run_dir = Path(run_dir)
        folder = run_dir if (run_dir / "meta.json").is_file() else run_dir / FOLDER
        if not (folder / "meta.json").is_file():
            raise FileNotFoundError(f"{run_dir} has no feature records ({folder}/meta.json): {HOW_TO_MAKE}")
        remedy = f"Delete {folder} and {HOW_TO_MAKE}"
        meta = dict(read_json(folder / "meta.json", remedy))
        arrays = load_safetensors(folder / "records.safetensors", remedy, meta.pop("sha256", None))
        for k in ("format", "d_sae"):
            meta.pop(k, None)
        n_tokens, window, rng = meta.pop("n_tokens"), meta.pop("window"), meta.pop("log10_range")
        return cls(
            n_tokens=int(n_tokens),
            window=(int(window[0]), int(window[1])),
            log10_range=(float(rng[0]), float(rng[1])),
            meta=meta,
            **{k: arrays[k] for k in cls._ARRAYS},
        )


def _jsonl_record(r: LatentRecord, decode: Callable[[int], str] | None) -> dict:
    def ctx(c: Context) -> dict:
        d: dict[str, Any] = {"doc": c.doc, "pos": c.pos, "act": c.act, "tokens": c.tokens, "acts": c.acts}
        if decode is not None:
            d["text"] = [decode(t) if t >= 0 else None for t in c.tokens]
        if c.quantile is not None:
            d["quantile"] = c.quantile
        return d

    return {
        "latent": r.latent,
        "count": r.count,
        "density": r.density,
        "mean_act": r.mean_act,
        "hist": r.hist,
        "top": [ctx(c) for c in r.top],
        "samples": [ctx(c) for c in r.samples],
    }


# ---------------------------------------------------------------------- streaming selections
def _keep_largest(
    keys: Float[Tensor, "d_sae m"],
    payload: list[Tensor],
    cols: Int[Tensor, " nnz"],
    new_keys: Float[Tensor, " nnz"],
    new_payload: list[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """Per latent, the m entries with the largest key among the kept ones and the new (col, key) entries.

    Empty slots have key −inf. Equal keys keep the earlier entry (kept ones first, then batch order).
    Updates `keys` and `payload` in place and returns them.
    """
    m = keys.shape[1]
    if cols.numel() == 0:
        return keys, payload
    # re-sort only the latents that receive entries: t of them, local ids 0..t−1
    touched = torch.unique(cols)
    t = touched.numel()
    local = torch.searchsorted(touched, cols)
    all_cols = torch.cat([torch.arange(t, device=keys.device).repeat_interleave(m), local])
    all_keys = torch.cat([keys[touched].reshape(-1), new_keys])
    order = all_keys.argsort(descending=True, stable=True)
    order = order[all_cols[order].argsort(stable=True)]  # grouped by latent, largest key first
    c = all_cols[order]
    rank = torch.arange(c.numel(), device=c.device) - torch.searchsorted(c, c)
    keep = rank < m
    sel, c, rank = order[keep], touched[c[keep]], rank[keep]
    merged = [
        torch.cat([old[touched].reshape(-1), new])[sel] for old, new in zip(payload, new_payload, strict=True)
    ]
    keys[c, rank] = all_keys[sel]  # in place: every read of the old entries is above
    for old, v in zip(payload, merged, strict=True):
        old[c, rank] = v
    return keys, payload


class _Largest:
    """Per latent, the m entries with the largest key seen so far, with payload columns.

    An entry enters a buffer only if its key beats its latent's current m-th key (a stale threshold lets
    more in, never fewer, so the result is exact); the buffer is folded in by `_keep_largest` once it holds
    as many entries as the table, so one sort serves many batches.
    """

    def __init__(self, d_sae: int, m: int, payload: list[Tensor]) -> None:
        self.keys = torch.full((d_sae, m), -torch.inf, device=payload[0].device)
        self.payload = payload  # [d_sae, m] each, holding the empty value
        self._pending: list[tuple[Tensor, Tensor, list[Tensor]]] = []
        self._n = 0

    def add(self, cols: Int[Tensor, " nnz"], keys: Float[Tensor, " nnz"], *payload: Tensor) -> None:
        enter = keys > self.keys[cols, -1]
        self._pending.append((cols[enter], keys[enter], [p[enter] for p in payload]))
        self._n += int(enter.sum())
        if self._n >= self.keys.numel():
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        cols, keys, payload = zip(*self._pending, strict=True)
        new_payload = [torch.cat(p) for p in zip(*payload, strict=True)]
        _keep_largest(self.keys, self.payload, torch.cat(cols), torch.cat(keys), new_payload)
        self._pending, self._n = [], 0


# ---------------------------------------------------------------------- row readers
class _StoreRows:
    """Rows of a harvested split (activation cache or in-memory store), read by storage index."""

    def __init__(self, store) -> None:
        missing = {"doc_id", "doc_pos"} - set(store.columns)
        if missing:
            raise ValueError(
                f"the activation store has no {', '.join(sorted(missing))} column: it was harvested by an "
                "older saelab; delete that activation cache entry so it is rebuilt with document positions."
            )
        self.store, self.n = store, int(store.n_tokens)

    def chunks(self, n: int, size: int) -> Iterator[Float[Tensor, "c d_in"]]:
        for i in range(0, n, size):
            a = self.store.rows(np.arange(i, min(i + size, n)), ["acts"])["acts"]
            yield torch.from_numpy(a.astype(np.float32, copy=False))

    def columns(self, idx: Int[Tensor, " u"]) -> dict[str, Tensor]:
        r = self.store.rows(idx.numpy(), ["token_ids", "doc_id", "doc_pos"])
        return {k: torch.from_numpy(v.astype(np.int64)) for k, v in r.items()}

    def acts(self, idx: Int[Tensor, " u"]) -> Float[Tensor, "u d_in"]:
        a = self.store.rows(idx.numpy(), ["acts"])["acts"]
        return torch.from_numpy(a.astype(np.float32, copy=False))


class _HostRows:
    """Rows of a split that is not cached: the host runs on the packed contexts as rows are read."""

    def __init__(self, host, contexts, harvest_batch: int, d_in: int | None) -> None:
        self.host, self.contexts, self.harvest_batch, self.d_in = host, contexts, harvest_batch, d_in
        m = contexts.sae_mask
        self.cols = {
            "token_ids": contexts.input_ids[m],
            "doc_id": contexts.doc_ids[m],
            "doc_pos": contexts.doc_pos[m],
        }
        self.cum = torch.cat([torch.zeros(1, dtype=torch.long), m.sum(1).cumsum(0)])
        self.n = int(self.cum[-1])

    def _harvest(self, contexts) -> Iterator[Tensor]:
        from saelab.data.text import harvest

        for acts, _, _ in harvest(self.host, contexts, self.harvest_batch, progress=False, d_in=self.d_in):
            yield acts

    def chunks(self, n: int, size: int) -> Iterator[Float[Tensor, "c d_in"]]:
        k = int(torch.searchsorted(self.cum, n, right=False))  # contexts covering rows [0, n)
        seen = 0
        for acts in self._harvest(self.contexts.slice(0, k)):
            acts = acts[: n - seen]
            seen += acts.shape[0]
            for i in range(0, acts.shape[0], size):
                yield acts[i : i + size]

    def columns(self, idx: Int[Tensor, " u"]) -> dict[str, Tensor]:
        return {k: v[idx] for k, v in self.cols.items()}

    def acts(self, idx: Int[Tensor, " u"]) -> Float[Tensor, "u d_in"]:
        ctx = torch.searchsorted(self.cum, idx, right=True) - 1
        need, inv = torch.unique(ctx, return_inverse=True)
        got = torch.cat(list(self._harvest(self.contexts.select(need))))
        lengths = self.cum[need + 1] - self.cum[need]
        start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        return got[start[inv] + idx - self.cum[ctx]]


def _rows(source, split: str) -> _StoreRows | _HostRows:
    if getattr(source, "cache", True) is False and hasattr(source, "contexts"):
        return _HostRows(source.host, source.contexts(split), source.harvest_batch, source.d_in)
    return _StoreRows(source.store(split))


# ---------------------------------------------------------------------- collection
def _nonzero(out) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, vals) of the positive codes of one SAE forward, without a dense matrix when sparse."""
    if out.sparse is not None:
        r, c, v = out.sparse.rows, out.sparse.cols, out.sparse.vals
    else:
        r, c = torch.nonzero(out.codes > 0, as_tuple=True)
        v = out.codes[r, c]
    pos = v > 0
    return r[pos], c[pos], v[pos].float()


@torch.no_grad()
def collect_feature_records(
    sae,
    source,
    split: str = "val",
    n_tokens: int | None = None,
    top_k: int = 20,
    n_quantiles: int = 10,
    per_quantile: int = 4,
    reservoir: int = 256,
    window: tuple[int, int] = (16, 4),
    batch: int = 2048,
    n_bins: int = 64,
    log10_range: tuple[float, float] = (-4.0, 4.0),
    seed: int = 0,
) -> FeatureRecords:
    """Stream the first `n_tokens` rows of a split (None = all) through `sae` and keep per-latent records.

    `source`: a `TextActivations` (or any source with `store(split)` whose rows carry "doc_id" and
    "doc_pos"); with `cache=False` the host runs on the packed contexts instead of harvesting the split.
    See the module docstring for what is kept and how.
    """
    if top_k < 1 or n_quantiles < 1 or per_quantile < 0 or reservoir < n_quantiles:
        raise ValueError(
            f"need top_k ≥ 1, n_quantiles ≥ 1, per_quantile ≥ 0 and reservoir ≥ n_quantiles; got "
            f"top_k={top_k}, n_quantiles={n_quantiles}, per_quantile={per_quantile}, reservoir={reservoir}."
        )
    left, right = (int(w) for w in window)
    if left < 0 or right < 0:
        raise ValueError(f"window=(left, right) must be non-negative, got {window}.")
    rows = _rows(source, split)
    n = rows.n if n_tokens is None else min(int(n_tokens), rows.n)
    s = float(getattr(source, "act_scale", 1.0) or 1.0)
    d_sae = int(sae.W_dec.shape[0])
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    lo, hi = log10_range
    gen = torch.Generator(device=dev).manual_seed(seed)

    count = torch.zeros(d_sae, dtype=torch.long, device=dev)
    act_sum = torch.zeros(d_sae, dtype=torch.float64, device=dev)
    hist = torch.zeros(d_sae * n_bins, dtype=torch.long, device=dev)
    top = _Largest(d_sae, top_k, [torch.full((d_sae, top_k), -1, dtype=torch.long, device=dev)])  # rows
    res = _Largest(  # key: a uniform priority; payload: rows, activations
        d_sae,
        reservoir,
        [
            torch.full((d_sae, reservoir), -1, dtype=torch.long, device=dev),
            torch.zeros(d_sae, reservoir, device=dev),
        ],
    )
    start = 0
    for x in rows.chunks(n, batch):
        out = sae((x * s).to(dev, dt))
        r, c, v = _nonzero(out)
        v = v / s  # host units
        r = r + start
        start += x.shape[0]
        count += torch.bincount(c, minlength=d_sae)
        act_sum.index_add_(0, c, v.double())
        b = ((v.log10() - lo) / (hi - lo) * n_bins).floor().clamp(0, n_bins - 1).long()  # (nnz,)
        hist += torch.bincount(c * n_bins + b, minlength=d_sae * n_bins)
        top.add(c, v, r)
        res.add(c, torch.rand(v.shape[0], generator=gen, device=dev), r, v)
    top.flush()
    res.flush()

    top_row = top.payload[0].cpu()
    top_act = top.keys.clamp_min(0).cpu()  # empty slots: −inf → 0
    sample_row, sample_act, sample_q = _quantile_samples(
        res.payload[0].cpu(), res.payload[1].cpu(), n_quantiles, per_quantile, seed
    )
    win = _windows(sae, rows, s, torch.cat([top_row, sample_row], 1), left, right, batch)
    k = top_k
    meta = {
        "split": split,
        "act_scale": s,
        "top_k": top_k,
        "n_quantiles": n_quantiles,
        "per_quantile": per_quantile,
        "reservoir": reservoir,
        "seed": seed,
    }
    key = getattr(source, "key", None)
    if callable(key):
        meta["source"] = key(split)
    return FeatureRecords(
        n_tokens=n,
        window=(left, right),
        log10_range=(float(lo), float(hi)),
        count=count.cpu(),
        act_sum=act_sum.cpu(),
        hist=hist.view(d_sae, n_bins).cpu(),
        top_act=top_act,
        top_row=top_row,
        top_doc=win["doc"][:, :k],
        top_pos=win["pos"][:, :k],
        top_tokens=win["tokens"][:, :k],
        top_window_acts=win["acts"][:, :k],
        sample_act=sample_act,
        sample_row=sample_row,
        sample_doc=win["doc"][:, k:],
        sample_pos=win["pos"][:, k:],
        sample_quantile=sample_q,
        sample_tokens=win["tokens"][:, k:],
        sample_window_acts=win["acts"][:, k:],
        meta=meta,
    )


def _quantile_samples(
    rows: Int[Tensor, "d_sae r"], acts: Float[Tensor, "d_sae r"], n_quantiles: int, per: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """From each latent's uniform sample: sort by activation, cut into `n_quantiles` equal-count bins, draw
    `per` positions from each (delphi's `split_quantiles`). Returns (rows, acts, bin), [d_sae, n_q · per]."""
    d_sae, r = rows.shape
    m = n_quantiles * per
    out = [torch.full((d_sae, m), -1, dtype=torch.long), torch.zeros(d_sae, m)]
    out_q = torch.arange(n_quantiles).repeat_interleave(per).expand(d_sae, m).clone()
    n_fill = (rows >= 0).sum(1, keepdim=True)  # (d_sae, 1)
    if m == 0:
        return out[0], out[1], out_q
    order = torch.where(rows >= 0, acts, torch.inf).argsort(dim=1, stable=True)  # empty slots last
    rows, acts = rows.gather(1, order), acts.gather(1, order)  # ascending activation
    # sorted position p of an nj-entry sample falls in bin ⌊p·n_q / nj⌋ (equal-count bins)
    q = torch.arange(r) * n_quantiles // n_fill.clamp_min(1)
    q = torch.where(torch.arange(r) < n_fill, q, n_quantiles)  # (d_sae, r); n_q = empty
    # a random order inside each bin: sort by bin + a uniform in [0, 1), rank within the bin
    pri = torch.rand(d_sae, r, generator=torch.Generator().manual_seed(seed + 1))
    by = (q + pri).argsort(1)
    q_sorted = q.gather(1, by)
    rank = torch.arange(r) - torch.searchsorted(q_sorted, q_sorted)
    keep = (rank < per) & (q_sorted < n_quantiles)
    lat = torch.arange(d_sae)[:, None].expand(d_sae, r)[keep]
    slot = (q_sorted * per + rank)[keep]
    for o, v in zip(out, (rows, acts), strict=True):
        o[lat, slot] = v.gather(1, by)[keep]
    out_q[out[0] < 0] = -1
    return out[0], out[1], out_q


def _windows(
    sae,
    rows: _StoreRows | _HostRows,
    s: float,
    centre: Int[Tensor, "d_sae m"],
    left: int,
    right: int,
    batch: int,
) -> dict[str, Tensor]:
    """Document, position, window token ids and the latent's per-token activations around each `centre` row."""
    d_sae, m = centre.shape
    w = left + right + 1
    off = torch.arange(-left, right + 1)
    at = centre[..., None] + off  # (d_sae, m, w) storage rows
    valid = (centre[..., None] >= 0) & (at >= 0) & (at < rows.n)
    need = torch.unique(torch.cat([at[valid], centre[centre >= 0]]))
    cols = rows.columns(need)
    where = torch.searchsorted(need, at.clamp(0, rows.n - 1)).clamp_max(max(need.numel() - 1, 0))
    doc = torch.full((d_sae, m), -1, dtype=torch.long)
    pos = torch.full((d_sae, m), -1, dtype=torch.long)
    tokens = torch.full((d_sae, m, w), -1, dtype=torch.int32)
    acts = torch.zeros(d_sae, m, w)
    if need.numel() == 0:
        return {"doc": doc, "pos": pos, "tokens": tokens, "acts": acts}
    c_doc, c_pos = cols["doc_id"][where[..., left]], cols["doc_pos"][where[..., left]]
    # a window position belongs to the centre's document and continues its positions
    valid &= (cols["doc_id"][where] == c_doc[..., None]) & (cols["doc_pos"][where] == c_pos[..., None] + off)
    has = centre >= 0
    doc[has], pos[has] = c_doc[has], c_pos[has]
    tokens[valid] = cols["token_ids"][where[valid]].int()
    # the latent's activation at each valid window row: encode the needed rows in chunks
    lat = torch.arange(d_sae)[:, None, None].expand(d_sae, m, w)[valid]
    slot = where[valid]
    order = slot.argsort()
    slot, lat = slot[order], lat[order]
    vals = torch.empty(slot.numel())
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    for a in range(0, need.numel(), batch):
        b = min(a + batch, need.numel())
        i0, i1 = (int(t) for t in torch.searchsorted(slot, torch.tensor([a, b])))
        if i1 == i0:
            continue
        f = sae((rows.acts(need[a:b]) * s).to(dev, dt)).codes.float().cpu() / s  # (chunk, d_sae)
        vals[i0:i1] = f[slot[i0:i1] - a, lat[i0:i1]]
    filled = torch.empty_like(vals)
    filled[order] = vals
    acts[valid] = filled
    return {"doc": doc, "pos": pos, "tokens": tokens, "acts": acts}
