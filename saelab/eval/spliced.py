"""Spliced evaluation: the host LM's next-token loss with an SAE reconstruction in place of its activations.

For tokens x_1..x_T and per-position next-token losses ℓ_t = −log p(x_{t+1} | x_≤t) (averaged over every
position whose target is not padding):

  CE_clean = mean ℓ_t of the unmodified model;
  CE_sae   = mean ℓ_t with the hook output h replaced by the SAE reconstruction x̂(h);
  CE_zero  = mean ℓ_t with h replaced by 0 (zero-ablation);
  ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean)      (1 = lossless, 0 = as bad as ablation);
  KL_sae  = mean_t KL(p_clean,t ‖ p_sae,t),  KL_zero = mean_t KL(p_clean,t ‖ p_zero,t),
  kl_score = (KL_zero − KL_sae) / KL_zero;
  spliced_ppl = exp(CE_sae) (downstream perplexity, Muhamed et al. 2025, arXiv:2411.00743), clean_ppl = exp(CE_clean).

Definitions follow SAELens `evals.py` (`get_recons_loss`, `kl_div_score`); positions masked out of the SAE
(BOS and padding) keep their original activation under every splice, including zero-ablation.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.analysis import plots
from saelab.eval.base import EvalResult, at_k, batch_acts, in_host_units, take
from saelab.hosts.causal_lm import next_token_losses

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def ce_loss_score(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean); NaN when ablation does not change the loss."""
    denom = ce_zero - ce_clean
    return (ce_zero - ce_sae) / denom if denom != 0 else float("nan")


def kl_score(kl_sae: float, kl_zero: float) -> float:
    """(KL_zero − KL_sae) / KL_zero; NaN when ablation leaves the distribution unchanged."""
    return (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else float("nan")


def token_kl(
    clean_logits: Float[Tensor, "batch seq vocab"], new_logits: Float[Tensor, "batch seq vocab"]
) -> Float[Tensor, "batch seq"]:
    """KL(p_clean ‖ p_new) = Σ_v p_clean,v (log p_clean,v − log p_new,v) at each position."""
    lp, lq = F.log_softmax(clean_logits.float(), -1), F.log_softmax(new_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def sae_splice(sae: nn.Module, mask: Bool[Tensor, "batch seq"]) -> Callable[[Tensor], Tensor]:
    """fn(h): h with the masked positions replaced by sae(h).x_hat (the others keep h)."""

    def fn(h: Tensor) -> Tensor:
        m = mask.to(h.device)
        out = h.clone()
        dev = next(sae.parameters()).device
        out[m] = sae(h[m].to(dev)).x_hat.to(h.dtype).to(h.device)  # (n_masked, d_in)
        return out

    return fn


def zero_splice(mask: Bool[Tensor, "batch seq"]) -> Callable[[Tensor], Tensor]:
    def fn(h: Tensor) -> Tensor:
        return h.masked_fill(mask.to(h.device)[..., None], 0.0)

    return fn


@torch.no_grad()
def spliced_metrics(
    host,
    saes: dict[str, nn.Module],
    input_ids: Tensor,
    attention_mask: Tensor,
    sae_mask: Tensor,
    batch_size: int = 8,
    desc: str = "spliced eval",
    reference: dict | None = None,
) -> dict[str, dict]:
    """CE / KL / ce_loss_score / kl_score / spliced perplexity of each SAE in `saes` on the given contexts.

    The clean and zero-ablated forwards run once per batch and are shared by all SAEs. `reference`, a
    dict kept by the caller for these contexts, holds each batch's clean logits and clean/zero sums after
    the first call, so later calls (other SAEs on the same contexts) run only their own forwards. Returns
    {name: {ce_clean, ce_sae, ce_zero, ce_loss_score, kl_sae, kl_zero, kl_score, spliced_ppl, clean_ppl,
    n_tokens}}.
    """
    for sae in saes.values():
        sae.eval()
    ce = {k: 0.0 for k in saes}
    kl = {k: 0.0 for k in saes}
    ref = {"ce_clean": 0.0, "ce_zero": 0.0, "kl_zero": 0.0}  # apart from `ce`: an SAE may be named "zero"
    n = 0
    bar = tqdm(total=input_ids.shape[0], desc=desc, unit="ctx", leave=False)
    for i in range(0, input_ids.shape[0], batch_size):
        ids, att, m = (
            input_ids[i : i + batch_size],
            attention_mask[i : i + batch_size],
            sae_mask[i : i + batch_size],
        )
        valid = att[:, 1:].to(torch.float64)  # (B, T-1): positions with a real next token
        n += int(valid.sum())
        cached = reference.get(i) if reference is not None else None
        if cached is None:
            clean = host.logits(ids, att)
            ids_d = ids.to(clean.device)
            ce_clean = float((next_token_losses(clean, ids_d, att).double() * valid).sum())
            with host.spliced(zero_splice(m)):
                logits = host.logits(ids, att)
            ce_zero = float((next_token_losses(logits, ids_d, att).double() * valid).sum())
            kl_zero = float((token_kl(clean[:, :-1], logits[:, :-1]).double() * valid).sum())
            if reference is not None:
                reference[i] = (clean, ce_clean, ce_zero, kl_zero)
        else:
            clean, ce_clean, ce_zero, kl_zero = cached
            ids_d = ids.to(clean.device)
        ref["ce_clean"] += ce_clean
        ref["ce_zero"] += ce_zero
        ref["kl_zero"] += kl_zero
        for name, sae in saes.items():
            with host.spliced(sae_splice(sae, m)):
                logits = host.logits(ids, att)
            ce[name] += float((next_token_losses(logits, ids_d, att).double() * valid).sum())
            kl[name] += float((token_kl(clean[:, :-1], logits[:, :-1]).double() * valid).sum())
        bar.update(ids.shape[0])
    bar.close()
    if n == 0:
        raise ValueError("spliced evaluation got no predictable tokens (every context is padding).")
    ce = {k: v / n for k, v in ce.items()}
    kl = {k: v / n for k, v in kl.items()}
    ce_clean, ce_zero, kl_zero = ref["ce_clean"] / n, ref["ce_zero"] / n, ref["kl_zero"] / n
    out = {}
    for name in saes:
        out[name] = {
            "ce_clean": ce_clean,
            "ce_sae": ce[name],
            "ce_zero": ce_zero,
            "ce_loss_score": ce_loss_score(ce_clean, ce[name], ce_zero),
            "kl_sae": kl[name],
            "kl_zero": kl_zero,
            "kl_score": kl_score(kl[name], kl_zero),
            "spliced_ppl": math.exp(ce[name]),
            "clean_ppl": math.exp(ce_clean),
            "n_tokens": n,
        }
    return out


class Spliced:
    """`spliced`: CE / KL / ce_loss_score / kl_score / spliced perplexity of the SAE in a causal LM host,
    and the perplexity-vs-L0 points of the same SAE at other inference-time k (`l0_at_k`).

    Reads the first ⌈tokens / SAE tokens per context⌉ held-out contexts of `source.contexts(split)`; the
    SAE is presented to the host in its units (`in_host_units`). The k-sweep uses `at_k` views, so the
    SAE itself is never changed; each point's L0 is measured on `l0_batches` held-out batches.

    Args:
        tokens: SAE-spliced tokens to score (≈ contexts × tokens per context).
        batch_size: contexts per host forward.
        l0_at_k: extra k for TopK-family SAEs (empty: none).
        l0_batches: held-out batches for each k's L0.
        split: which contexts of the source.
        reference_mb: the clean logits of these contexts are kept in memory (per host, per process) up
            to this size, so evaluating another SAE on the same contexts costs one forward per batch,
            not three; 0 turns that off.
    """

    name = "spliced"
    needs = ("host", "contexts")

    def __init__(
        self,
        tokens: int = 2048,
        batch_size: int = 8,
        l0_at_k: list[int] | tuple[int, ...] = (),
        l0_batches: int = 4,
        split: str = "val",
        reference_mb: float = 2048,
    ) -> None:
        self.tokens, self.batch_size, self.split = int(tokens), int(batch_size), split
        self.reference_mb = float(reference_mb)
        self.l0_at_k, self.l0_batches = [int(k) for k in (l0_at_k or [])], int(l0_batches)

    @torch.no_grad()
    def __call__(self, sae, source, out_dir) -> EvalResult:
        ctx = source.contexts(self.split)
        per = max(1, int(ctx.sae_mask[0].sum()))
        ctx = ctx.slice(0, max(1, math.ceil(self.tokens / per)))
        runs: dict[str, nn.Module] = {"sae": in_host_units(sae, source)}
        ks = self.l0_at_k if hasattr(getattr(sae, "activation", None), "k") else []
        for k in ks:
            runs[f"k={k}"] = in_host_units(at_k(sae, k), source)
        sp = spliced_metrics(
            source.host,
            runs,
            ctx.input_ids,
            ctx.attention_mask,
            ctx.sae_mask,
            self.batch_size,
            "spliced eval",
            reference=self._reference(source.host, ctx.input_ids),
        )
        m = dict(sp["sae"])
        m["spliced_tokens"] = m.pop("n_tokens")
        points = []
        for k in ks:
            view = at_k(sae, k)
            l0 = _mean_l0(view, take(source.val_dataloader(), self.l0_batches))
            points.append({"k": k, "l0": l0, "spliced_ppl": sp[f"k={k}"]["spliced_ppl"]})
        return EvalResult(metrics=m, data={"l0_at_k": points} if points else {})

    def _reference(self, host, input_ids: Tensor) -> dict | None:
        """This host's cached clean/zero results for these contexts (a new empty dict the first time)."""
        vocab = getattr(getattr(getattr(host, "model", None), "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or input_ids.numel() * vocab * 4 > self.reference_mb * 2**20:
            return None
        try:
            per_host = _REFERENCES.setdefault(host, {})
        except TypeError:  # a host that cannot be weakly referenced: no cache
            return None
        key = (
            hashlib.sha256(input_ids.numpy().tobytes()).hexdigest(),
            tuple(input_ids.shape),
            self.batch_size,
        )
        return per_host.setdefault(key, {})


# host → {(contexts digest, shape, batch size): {batch start: (clean logits, ce_clean, ce_zero, kl_zero)}};
# entries go with their host
_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mean_l0(sae, batches) -> float:
    """Mean active latents per row over `batches`."""
    tot, n = 0.0, 0
    dev = sae.W_dec.device
    for b in batches:
        out = sae(batch_acts(b).to(dev))
        tot, n = tot + float(out.l0.sum()), n + out.l0.numel()
    return tot / max(1, n)


def ppl_vs_l0(results: Mapping[str, EvalResult]) -> dict[str, list[dict]]:
    """{SAE: [{l0, spliced_ppl}] sorted by L0}: each SAE's own point (`core` L0, `spliced` perplexity) and
    the `spliced` evaluator's points at other inference-time k (`data["l0_at_k"]`)."""
    out = {}
    for n, r in results.items():
        pts = [(p["l0"], p["spliced_ppl"]) for p in r.data.get("l0_at_k", [])]
        pts.append((r.metrics["l0"], r.metrics.get("spliced_ppl", math.nan)))
        out[n] = [{"l0": a, "spliced_ppl": b} for a, b in sorted(pts)]
    return out


def ppl_vs_l0_figure(curves: Mapping[str, list[dict]], clean_ppl: float | None = None) -> Figure:
    """The `ppl_vs_l0` curves, one line per SAE, and a dashed line at `clean_ppl`, the unmodified host's
    perplexity (what a lossless SAE would reach), when it is given."""
    clean = {}
    if clean_ppl is not None and math.isfinite(clean_ppl):
        clean[f"clean model ({clean_ppl:.3g})"] = clean_ppl
    return plots.scatter_figure(
        {n: ([p["l0"] for p in pts], [p["spliced_ppl"] for p in pts]) for n, pts in curves.items()},
        "L0 (active latents per token)",
        "in-domain spliced perplexity",
        "Perplexity vs L0 (held-out domain text)",
        hlines=clean,
    )


def ppl_vs_l0_plot(curves: Mapping[str, list[dict]], path: Path, clean_ppl: float | None = None) -> Path:
    """`ppl_vs_l0_figure` written as a PNG at `path`."""
    return plots.save(ppl_vs_l0_figure(curves, clean_ppl), path)
