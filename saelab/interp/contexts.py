"""Examples for auto-interpretation: decoded windows with the firing tokens marked, and non-activating windows.

An activating example is a window of `FeatureRecords` (a top context or a quantile sample, Paulo et al.
2024, arXiv:2410.13928 §2); its tokens with activation > 0 (and above a fraction of the window's largest, if
set) are marked <<like this>>, consecutive marked tokens as one span. A non-activating example is a window
of the same size around a random position of the same split on which the latent is zero at every token
(delphi's random "not active" examples), found by `non_activating_contexts` with the records' own window
reader, so its activations are checked, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from saelab.analysis.features import Context, _rows, _windows


@dataclass(frozen=True)
class Example:
    """A window as text: its decoded tokens and the latent's activation at each."""

    tokens: list[str]
    acts: list[float]

    def flags(self, frac: float = 0.0) -> list[bool]:
        """Which tokens to mark: activation > 0 and > frac · the window's largest activation."""
        top = max(self.acts, default=0.0)
        return [a > 0 and a > frac * top for a in self.acts]

    def text(self, marks: Sequence[bool] | None = None) -> str:
        """The window's text, with the tokens flagged in `marks` marked <<like this>> (none when None)."""
        return mark(self.tokens, marks if marks is not None else [False] * len(self.tokens))


def _show(s: str) -> str:
    return s.replace("\r", "").replace("\n", "\\n")  # one example per numbered line


def mark(tokens: Sequence[str], flags: Sequence[bool]) -> str:
    """Join `tokens`, wrapping each run of flagged tokens in << >> (a run's leading spaces stay outside)."""
    out, i = [], 0
    while i < len(tokens):
        if not flags[i]:
            out.append(_show(tokens[i]))
            i += 1
            continue
        j = i
        while j < len(tokens) and flags[j]:
            j += 1
        span = _show("".join(tokens[i:j]))
        body = span.lstrip(" ")
        out.append(span[: len(span) - len(body)] + "<<" + (body or span) + ">>")
        i = j
    return "".join(out)


def to_example(ctx: Context, decode: Callable[[int], str]) -> Example:
    """The window of `ctx` as an `Example` (positions outside the document, token −1, dropped)."""
    keep = [i for i, t in enumerate(ctx.tokens) if t >= 0]
    return Example([decode(ctx.tokens[i]) for i in keep], [float(ctx.acts[i]) for i in keep])


class _Columns:
    """An SAE seen through some of its latents: `codes` holds only `latents`' columns, in that order."""

    def __init__(self, sae: Any, latents: Sequence[int]) -> None:
        self.sae, self.W_dec = sae, sae.W_dec  # W_dec: the window reader takes device and dtype from it
        self.idx = torch.as_tensor(list(latents), dtype=torch.long, device=sae.W_dec.device)

    def __call__(self, x: Tensor) -> SimpleNamespace:
        return SimpleNamespace(codes=self.sae(x).codes[:, self.idx])  # (batch, n_latents)


@torch.no_grad()
def non_activating_contexts(
    sae: Any,
    source: Any,
    latents: Sequence[int],
    n: int,
    n_rows: int,
    window: tuple[int, int],
    split: str = "val",
    seed: int = 0,
    batch: int = 2048,
    oversample: int = 4,
    rounds: int = 3,
) -> dict[int, list[Context]]:
    """Per latent, up to `n` windows around random rows of the split's first `n_rows` on which it never fires.

    Each round draws `n · oversample` centres uniformly for every latent still short of `n`; each window is
    read and re-encoded like the records' windows (host units, inside the centre's document), and kept when
    the latent is 0 at every token and at least half the window lies inside the document. A latent that
    fires almost everywhere may end with fewer than `n` after `rounds` rounds.
    """
    n = int(n)
    out: dict[int, list[Context]] = {int(j): [] for j in latents}
    if not out or n <= 0:
        return out
    rows = _rows(source, split)
    n_rows = min(int(n_rows), rows.n)
    left, right = (int(w) for w in window)
    g = torch.Generator().manual_seed(int(seed))
    m = n * max(1, int(oversample))
    s = float(getattr(source, "act_scale", 1.0) or 1.0)
    seen: dict[int, set[tuple[int, int]]] = {j: set() for j in out}
    for _ in range(max(1, int(rounds))):
        short = [j for j in out if len(out[j]) < n]
        if not short:
            break
        centre = torch.randint(0, n_rows, (len(short), m), generator=g)  # (n_short, m) storage rows
        win = _windows(_Columns(sae, short), rows, s, centre, left, right, batch)
        inside = win["tokens"] >= 0  # (n_short, m, w)
        ok = (win["acts"] <= 0).all(-1) & (inside.sum(-1) * 2 >= left + right + 1) & (win["doc"] >= 0)
        for a, j in enumerate(short):
            for p in torch.nonzero(ok[a]).squeeze(1).tolist():
                if len(out[j]) == n:
                    break
                at = (int(win["doc"][a, p]), int(win["pos"][a, p]))
                if at in seen[j]:  # the same centre drawn twice
                    continue
                seen[j].add(at)
                out[j].append(Context(*at, 0.0, win["tokens"][a, p].tolist(), win["acts"][a, p].tolist()))
    return out
