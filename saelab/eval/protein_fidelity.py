"""Fidelity of an SAE spliced into a protein masked LM: sequence recovery, KL and ΔCE.

As in Villegas Garcia & Ansuini (arXiv:2502.09135, `SAE_evaluation.py`), the hook output h is replaced
by the reconstruction x̂(s·h)/s and the model's outputs are compared with the clean ones. A share
`mask_fraction` of residues is masked (seeded), as in masked-LM evaluation; per residue position i:

  recovery   = mean_i [argmax p_sae(i) = argmax p_clean(i)]          (all residue positions)
  KL         = mean_i KL(p_clean(i) ‖ p_sae(i))                       (all residue positions)
  CE         = mean_i −log p(true residue_i)                          (masked positions only)
  ΔCE        = CE_sae − CE_clean
  ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean), CE_zero with h replaced by 0
  accuracy   = share of masked positions whose argmax is the true residue (clean and spliced).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from saelab.eval.base import EvalResult
from saelab.hosts.masked_lm import MaskedLMHost


def reconstruction_fn(sae, scale: float):
    """h ↦ x̂(s·h)/s, applied to every position of a [batch, seq, d_in] hook output."""

    @torch.no_grad()
    def fn(h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1]).float() * scale
        return (sae(x).x_hat / scale).reshape(h.shape).to(h.dtype)

    return fn


def _log_probs(host: MaskedLMHost, ids: torch.Tensor, attention_mask: torch.Tensor, fn=None) -> torch.Tensor:
    """Log-probabilities over the 20 amino acids, [batch, seq, 20], with `fn` spliced at the hook if given."""
    if fn is None:
        logits = host.logits(ids, attention_mask)
    else:
        with host.spliced(fn):
            logits = host.logits(ids, attention_mask)
    return torch.log_softmax(logits[..., host.aa_ids.to(logits.device)].float(), dim=-1)


@torch.no_grad()
def protein_fidelity(
    host: MaskedLMHost,
    sae,
    scale: float,
    sequences: Sequence[str],
    mask_fraction: float = 0.15,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Recovery, KL, CE (clean / spliced / zero-ablated), ΔCE, ce_loss_score and accuracy over `sequences`."""
    was_training = sae.training
    sae.eval()
    g = torch.Generator().manual_seed(seed)
    splice, zero = reconstruction_fn(sae, scale), (lambda h: torch.zeros_like(h))
    sums = dict.fromkeys(("agree", "kl", "ce_clean", "ce_sae", "ce_zero", "acc_clean", "acc_sae"), 0.0)
    n_res = n_masked = 0
    # three host forwards per batch (clean, spliced, zero-ablated): a long, otherwise silent wait on CPU
    batches = range(0, len(sequences), batch_size)
    for s in tqdm(batches, desc=f"protein fidelity ({len(sequences)} sequences)", unit="batch", leave=False):
        b = host.encode(list(sequences[s : s + batch_size])).to(host.device)
        ids = b.input_ids.clone()
        masked = b.residues & (torch.rand(ids.shape, generator=g) < mask_fraction).to(host.device)
        ids[masked] = host.mask_id
        aa = host.aa_ids.to(host.device)
        # true residue class among the 20 amino acids (non-standard residues are left out of CE)
        lookup = torch.full((int(max(host.vocab.values())) + 1,), -1, dtype=torch.long, device=host.device)
        lookup[aa] = torch.arange(len(aa), device=host.device)
        target = lookup[b.input_ids]
        scored = masked & (target >= 0)

        lp_clean, lp_sae, lp_zero = (
            _log_probs(host, ids, b.attention_mask, fn) for fn in (None, splice, zero)
        )
        r = b.residues
        sums["agree"] += float((lp_clean.argmax(-1) == lp_sae.argmax(-1))[r].sum())
        kl = (lp_clean.exp() * (lp_clean - lp_sae)).sum(-1)  # [batch, seq]
        sums["kl"] += float(kl[r].sum())
        t = target.clamp_min(0)[..., None]
        for name, lp in (("clean", lp_clean), ("sae", lp_sae), ("zero", lp_zero)):
            sums[f"ce_{name}"] += float(-lp.gather(-1, t).squeeze(-1)[scored].sum())
        sums["acc_clean"] += float((lp_clean.argmax(-1) == target)[scored].sum())
        sums["acc_sae"] += float((lp_sae.argmax(-1) == target)[scored].sum())
        n_res += int(r.sum())
        n_masked += int(scored.sum())
    sae.train(was_training)
    if n_masked == 0:
        raise ValueError(
            "no masked residues to score; use more or longer sequences or a larger mask_fraction."
        )
    ce = {k: sums[f"ce_{k}"] / n_masked for k in ("clean", "sae", "zero")}
    denom = ce["zero"] - ce["clean"]
    return {
        "recovery": sums["agree"] / n_res,
        "kl": sums["kl"] / n_res,
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "delta_ce": ce["sae"] - ce["clean"],
        "ce_loss_score": (ce["zero"] - ce["sae"]) / denom if abs(denom) > 1e-12 else float("nan"),
        "acc_clean": sums["acc_clean"] / n_masked,
        "acc_sae": sums["acc_sae"] / n_masked,
        "n_residues": n_res,
        "n_masked": n_masked,
    }


class ProteinFidelity:
    """`protein_fidelity`: the SAE spliced into a masked protein LM on the source's held-out sequences:
    `recovery`, `kl`, `ce_clean` / `ce_sae` / `ce_zero`, `delta_ce`, `ce_loss_score`, `acc_clean` / `acc_sae`
    (see `protein_fidelity`). The source's `act_scale` is undone at the splice.
    """

    name = "protein_fidelity"
    needs = ("host", "val_sequences")

    def __init__(self, mask_fraction: float = 0.15, batch_size: int = 8, seed: int = 0) -> None:
        self.mask_fraction, self.batch_size, self.seed = float(mask_fraction), int(batch_size), int(seed)

    def __call__(self, sae, source, out_dir) -> EvalResult:
        scale = float(getattr(source, "act_scale", 1.0) or 1.0)
        fid = protein_fidelity(
            source.host, sae, scale, source.val_sequences(), self.mask_fraction, self.batch_size, self.seed
        )
        m = dict(fid)
        for k in ("n_residues", "n_masked"):
            m[k] = int(m[k])
        return EvalResult(metrics=m)
