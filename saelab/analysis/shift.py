"""SHIFT (Marks et al. 2024, "Sparse Feature Circuits", arXiv:2403.19647, §4) on document-level probes.

A linear probe reads the mean over a document's positions of the host activation at the SAE's hook,
    logit(doc) = w · mean_t h_t + b.
With the SAE spliced in, h_t = x̂_t + ε_t = Σ_j a_tj d_j + b_dec + ε_t (ε: the SAE's error, kept), so
    ∂logit / ∂a_tj = (w · d_j) / T  and  activation × gradient summed over positions = mean_t(a_tj) · (w · d_j).
Summed over documents this is each latent's attribution (`attribution`): exact, because the probe reads the
splice's own output linearly (no later layer in between). Zero-ablating a set S of latents in the splice
changes the pooled activation by −Σ_{j∈S} mean_t(a_tj) d_j (`ablate`), again exactly.

Latents are picked for the spurious attribute (gender) by their effect on a gender probe trained on labelled
biographies outside the study's two professions (`saelab.eval.scr.latent_effects`), so the test set is never
used to choose them. The neuron skyline applies the same selection to host dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from saelab.edit import LatentEdit
from saelab.hosts.base import right_padded


def document_tokens(host, texts: Sequence[str], with_bos: bool = False) -> list[list[int]]:
    """Each document's token ids as `document_activations` runs them (BOS only `with_bos`)."""
    bos = getattr(host, "bos_id", None)
    limit = int(getattr(host, "max_length", 128)) - (bos is not None)
    out = []
    for t in texts:
        ids = list(host.tokenizer(t, add_special_tokens=False)["input_ids"])[:limit]
        out.append(([int(bos)] if with_bos and bos is not None else []) + ids)
    return out


@torch.no_grad()
def latent_top_tokens(
    sae,
    docs: Sequence[Tensor],
    tokens: Sequence[Sequence[int]],
    latents: Sequence[int],
    decode,
    act_scale: float = 1.0,
    n: int = 6,
) -> dict[int, list[str]]:
    """{latent: the `n` distinct tokens of `docs` on which it activates most}; only the latents' columns kept."""
    if not latents:
        return {}
    idx = torch.as_tensor(list(latents), dtype=torch.long)
    dev = sae.W_dec.device
    cols = torch.cat(
        [sae((d * act_scale).to(dev)).codes[:, idx].float().cpu() for d in docs]
    )  # (positions, L)
    ids = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
    out = {}
    for c, j in enumerate(latents):
        order = cols[:, c].argsort(descending=True)
        seen: set[int] = set()
        words: list[str] = []
        for i in order.tolist():
            if float(cols[i, c]) <= 0 or len(words) >= n:
                break
            if int(ids[i]) not in seen:
                seen.add(int(ids[i]))
                words.append(decode(int(ids[i])))
        out[int(j)] = words
    return out


@torch.no_grad()
def document_activations(
    host, texts: Sequence[str], batch_size: int = 16, desc: str = "documents: host forwards"
) -> list[Float[Tensor, "t d_in"]]:
    """Each document's hook activations (its tokens up to the host's max_length; the BOS position left out)."""
    seqs = document_tokens(host, texts, with_bos=True)
    skip = 1 if getattr(host, "bos_id", None) is not None else 0
    out: list[Tensor] = []
    for i in tqdm(range(0, len(seqs), batch_size), desc=desc, unit="batch", leave=False):
        chunk = seqs[i : i + batch_size]
        ids, att = right_padded(chunk, host.pad_id)
        h = host.activations(ids, att).float().cpu()
        out.extend(h[j, skip : len(s)] for j, s in enumerate(chunk))
    return out


@dataclass(frozen=True)
class Pooled:
    """Per-document means: `acts` (n, d_in) of the host activation, `codes` (n, d_sae) of one SAE's latents."""

    acts: Tensor
    codes: Tensor | None = None


@torch.no_grad()
def pool(docs: Sequence[Tensor], sae=None, act_scale: float = 1.0) -> Pooled:
    """Mean over each document's positions of its activations and (with `sae`, fed s·h) of its SAE codes."""
    acts = torch.stack([d.mean(0) for d in docs])
    if sae is None:
        return Pooled(acts)
    dev = sae.W_dec.device
    codes = torch.stack([sae((d * act_scale).to(dev)).codes.float().mean(0).cpu() for d in docs])
    return Pooled(acts, codes / act_scale)  # in host units: Σ_j (a_j / s) d_j reconstructs h


def attribution(
    codes: Float[Tensor, "n d_sae"], W_dec: Float[Tensor, "d_sae d_in"], w: Float[Tensor, " d_in"]
) -> Float[Tensor, " d_sae"]:
    """Σ_docs mean_t(a_j) · (w · d_j): activation × gradient of the probe logit, summed over positions and docs."""
    return codes.sum(0) * (W_dec.detach().float() @ w.float())


def ablate(
    acts: Float[Tensor, "n d_in"],
    codes: Float[Tensor, "n d_sae"],
    sae,
    latents: Sequence[int],
) -> Float[Tensor, "n d_in"]:
    """The pooled activations with `latents` zero-ablated in the splice (error term kept).

    The splice's zero edit (`saelab.edit.LatentEdit`) is linear in the codes, so on pooled codes in host
    units (`pool`) it is the pooled splice: acts − Σ_{j∈S} codes_j d_j.
    """
    return acts.float() + LatentEdit(sae, latents, "zero").delta_from_codes(codes.float()).float()


def ablate_neurons(acts: Float[Tensor, "n d_in"], neurons: Sequence[int]) -> Float[Tensor, "n d_in"]:
    out = acts.clone()
    out[:, list(neurons)] = 0.0
    return out


@dataclass(frozen=True)
class Probe:
    """A logistic-regression probe on standardised inputs: logit = w · x + b in the inputs' own units."""

    w: Tensor
    b: float
    epochs: int

    def logits(self, x: Tensor) -> Tensor:
        return x.float() @ self.w + self.b

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float(((self.logits(x) > 0).long() == y.long()).float().mean()) if len(y) else math.nan


def train_probe(
    x: Float[Tensor, "n d"],
    y: Tensor,
    val_frac: float = 0.2,
    lr: float = 1e-2,
    l2: float = 1e-3,
    max_epochs: int = 300,
    patience: int = 30,
    seed: int = 0,
) -> Probe:
    """Full-batch Adam on the logistic loss (+ l2/2·‖w‖²), stopped early on a held-out `val_frac` of the rows
    (stratified by label); the weights of the best held-out loss are returned. Deterministic given `seed`."""
    x, y = x.detach().float(), y.long()
    if len(set(y.tolist())) < 2:
        raise ValueError(f"a probe needs both labels among its {len(y)} training documents.")
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(y), dtype=torch.bool)
    for c in (0, 1):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        val[idx[: max(1, round(val_frac * len(idx)))]] = True
    mu, sd = x[~val].mean(0), x[~val].std(0).clamp_min(1e-6)
    z = (x.float() - mu) / sd
    pos = float(y[~val].float().mean())
    weight = torch.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))  # classes weighted equally
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    best, best_state, best_epoch, since = math.inf, (w.detach().clone(), b.detach().clone()), 0, 0
    for epoch in range(max_epochs):
        with torch.enable_grad():
            opt.zero_grad()
            loss = bce(z[~val] @ w + b, y[~val].float(), weight=weight[~val]) + 0.5 * l2 * w.pow(2).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            v = float(bce(z[val] @ w + b, y[val].float(), weight=weight[val]))
        if v < best - 1e-6:
            best, best_state, best_epoch, since = v, (w.detach().clone(), b.detach().clone()), epoch + 1, 0
        else:
            since += 1
            if since >= patience:
                break
    w_s, b_s = best_state
    w_raw = w_s / sd  # back to the inputs' units
    return Probe(w_raw, float(b_s - (mu / sd) @ w_s), best_epoch)


def group_accuracy(
    logits: Tensor, target: Sequence[str], spurious: Sequence[str], positive: str
) -> dict[str, float]:
    """Accuracy of a probe's `logits` (> 0: class `positive`) overall and in every (target, spurious) group,
    with the worst group's."""
    y = torch.tensor([t == positive for t in target], dtype=torch.long)
    pred = (logits > 0).long()
    out = {"accuracy": float((pred == y).float().mean())}
    for key in sorted(set(zip(target, spurious, strict=True))):
        m = torch.tensor([(t, s) == key for t, s in zip(target, spurious, strict=True)])
        out[f"{key[0]}/{key[1]}"] = float((pred[m] == y[m]).float().mean())
    out["worst_group"] = min(v for k, v in out.items() if "/" in k)
    return out
