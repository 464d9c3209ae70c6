"""Steer a protein masked LM with SAE latents during iterative masked sampling, and score the output.

Villegas Garcia & Ansuini (arXiv:2502.09135) shortlist latents enriched for an annotation (zinc
finger) and intervene on them while ESM-2 generates; 24 of 180 steered trials matched zinc-finger
motifs. The intervention here (the paper's exact one is unpublished):

  at the hook, per residue position: f = SAE.encode(s·h); f'_S = max(f_S, c·m_S) ("clamp") or
  f'_S = c·m_S ("set") for the selected latents S, with m_S their maximum activation on the data;
  h' = h + (f'_S − f_S) W_dec[S] / s.

Because the decoder is linear this equals decode(f') + (s·h − decode(f)) (the SAE error is kept), and
with c = 0 in clamp mode it is exactly the identity (f ≥ 0). Generation starts from an all-mask (or
partly masked seed) sequence and, over R rounds, unmasks a random share of the masked positions,
sampling each from softmax(logits / T) over the 20 amino acids.

Scores: the C2H2 zinc-finger motif C-x(2,4)-C-x(12)-H-x(3,5)-H (PROSITE PS00028's core), and a
transmembrane segment: a 19-residue window of mean Kyte–Doolittle hydropathy ≥ 1.6 (Kyte & Doolittle 1982).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saelab.hosts.masked_lm import MaskedLMHost

C2H2 = re.compile(r"C.{2,4}C.{12}H.{3,5}H")
KYTE_DOOLITTLE = {
    "A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2, "I": 4.5,
    "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9, "Y": -1.3, "V": 4.2,
}  # fmt: skip


def has_c2h2(seq: str) -> bool:
    """Whether the sequence contains the C2H2 zinc-finger motif C-x(2,4)-C-x(12)-H-x(3,5)-H."""
    return C2H2.search(seq) is not None


def max_hydropathy(seq: str, window: int = 19) -> float:
    """Largest mean Kyte–Doolittle hydropathy over windows of `window` residues (-inf if shorter)."""
    h = np.array([KYTE_DOOLITTLE.get(c, 0.0) for c in seq])
    if len(h) < window:
        return float("-inf")
    means = np.convolve(h, np.ones(window) / window, mode="valid")
    return float(means.max())


def has_tm_segment(seq: str, window: int = 19, threshold: float = 1.6) -> bool:
    """Whether some `window`-residue stretch has mean hydropathy ≥ `threshold` (a putative TM helix)."""
    return max_hydropathy(seq, window) >= threshold


def ch_fraction(seq: str) -> float:
    return (seq.count("C") + seq.count("H")) / max(len(seq), 1)


# target annotation → (success test, continuous score, what the score is)
SCORERS: dict[str, tuple[Callable[[str], bool], Callable[[str], float], str]] = {
    "zinc_finger": (has_c2h2, ch_fraction, "C2H2 motif C-x(2,4)-C-x(12)-H-x(3,5)-H; score = C+H fraction"),
    "transmembrane": (
        has_tm_segment,
        max_hydropathy,
        "19-residue window hydropathy ≥ 1.6; score = max window KD",
    ),
}


def scorer_for(annotation: str):
    base = annotation.split(":")[0]
    if base not in SCORERS:
        raise ValueError(f"no generation scorer for {annotation!r}; steering targets: {sorted(SCORERS)}.")
    return SCORERS[base]


class LatentClamp:
    """The steering intervention at the hook (see module docstring); call it on the hook output h.

    Args:
        sae: the trained SAE (on activations scaled by `scale`).
        latents: the latents S to steer.
        values: their target activations c·m_S (SAE units), one per latent or one for all.
        scale: the activation scale s the SAE was trained with.
        mode: "clamp" (f_S ← max(f_S, v)) or "set" (f_S ← v).
    """

    def __init__(
        self,
        sae,
        latents: Sequence[int],
        values: Sequence[float] | float,
        scale: float = 1.0,
        mode: str = "clamp",
    ) -> None:
        if mode not in ("clamp", "set"):
            raise ValueError(f"steering mode must be 'clamp' or 'set', got {mode!r}.")
        self.sae, self.scale, self.mode = sae, float(scale), mode
        self.latents = torch.as_tensor(list(latents), dtype=torch.long)
        v = torch.as_tensor(values, dtype=torch.float32)
        self.values = v.expand(len(self.latents)) if v.ndim == 0 else v
        if self.values.shape != self.latents.shape:
            raise ValueError(f"{len(self.latents)} latents but {self.values.numel()} clamp values.")
        self.positions: torch.Tensor | None = None  # [batch, seq] bool; None → every position

    @torch.no_grad()
    def __call__(self, h: Float[Tensor, "batch seq d_in"]) -> Float[Tensor, "batch seq d_in"]:
        if len(self.latents) == 0:
            return h
        x = h.reshape(-1, h.shape[-1]).float() * self.scale  # [batch*seq, d_in]
        f = self.sae.encode(x)[:, self.latents]  # [batch*seq, |S|]
        v = self.values.to(f)
        new = torch.maximum(f, v) if self.mode == "clamp" else v.expand_as(f)
        delta = (new - f) @ self.sae.W_dec[self.latents]  # [batch*seq, d_in]
        if self.positions is not None:
            delta = delta * self.positions.reshape(-1, 1).to(delta)
        return h + (delta / self.scale).reshape(h.shape).to(h.dtype)


@torch.no_grad()
def generate(
    host: MaskedLMHost,
    n: int,
    length: int,
    rounds: int = 10,
    temperature: float = 1.0,
    seed: int = 0,
    intervention: LatentClamp | None = None,
    seed_sequence: str | None = None,
    seed_mask_fraction: float = 0.5,
    batch_size: int = 16,
) -> list[str]:
    """Iterative masked sampling of `n` sequences, optionally under a steering intervention.

    Start: all-mask of `length` residues, or `seed_sequence` with its 'X' positions masked (or, with no
    'X', a random `seed_mask_fraction` of them). Each round unmasks ⌈remaining / rounds left⌉ random
    masked positions, sampled over the 20 amino acids. One torch Generator drives every random choice,
    so two calls with the same seed and an identity intervention return the same sequences.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    aa = host.aa_ids.to(host.device)
    out: list[str] = []
    for start in tqdm(range(0, n, batch_size), desc="generate", leave=False):
        b = min(batch_size, n - start)
        if seed_sequence is None:
            init = "X" * length
        else:
            init = seed_sequence.upper()
            if "X" not in init:
                chosen = torch.rand(len(init), generator=g) < seed_mask_fraction
                init = "".join("X" if c else a for a, c in zip(init, chosen.tolist(), strict=True))
        batch = host.encode([init.replace("X", "A")] * b)
        ids = batch.input_ids.clone()
        masked = batch.residues & torch.tensor([False, *[c == "X" for c in init], False]).expand_as(ids)
        ids[masked] = host.mask_id
        ids, att, res = (
            ids.to(host.device),
            batch.attention_mask.to(host.device),
            batch.residues.to(host.device),
        )
        masked = masked.to(host.device)
        for r in range(rounds):
            remaining = masked.sum(1)  # [b]
            if int(remaining.max()) == 0:
                break
            if intervention is not None:
                intervention.positions = res
                with host.spliced(intervention):
                    logits = host.logits(ids, att)
            else:
                logits = host.logits(ids, att)
            probs = torch.softmax(logits[..., aa].float() / temperature, dim=-1)  # [b, seq, 20]
            k = torch.ceil(remaining.float() / (rounds - r)).long()
            # pick k random masked positions per row: random keys, masked positions first
            keys = torch.rand(ids.shape, generator=g).to(host.device).masked_fill(~masked, 2.0)
            rank = keys.argsort(1).argsort(1)
            pick = masked & (rank < k[:, None])
            flat = probs[pick]  # [n_pick, 20]
            if flat.numel():
                sampled = torch.multinomial(flat.cpu(), 1, generator=g).squeeze(1)
                ids[pick] = aa[sampled.to(host.device)]
                masked = masked & ~pick
        out += [host.decode(row[res_row]) for row, res_row in zip(ids.cpu(), res.cpu(), strict=True)]
    if intervention is not None:
        intervention.positions = None
    return out


def score_generations(sequences: Sequence[str], target: str) -> dict:
    """Success count and mean continuous score of generated sequences for a target annotation."""
    hit, score, what = scorer_for(target)
    hits = [bool(hit(s)) for s in sequences]
    scores = [float(score(s)) for s in sequences]
    return {
        "n": len(sequences),
        "successes": int(sum(hits)),
        "success_rate": float(np.mean(hits)) if hits else 0.0,
        "mean_score": float(np.mean(scores)) if scores else float("nan"),
        "criterion": what,
    }


def compare(steered: dict, baseline: dict) -> float:
    """One-sided Fisher p-value that the steered success rate exceeds the baseline's."""
    from scipy.stats import fisher_exact

    table = [
        [steered["successes"], steered["n"] - steered["successes"]],
        [baseline["successes"], baseline["n"] - baseline["successes"]],
    ]
    return float(fisher_exact(table, alternative="greater").pvalue)
