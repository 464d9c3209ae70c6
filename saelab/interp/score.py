"""Scoring explanations: detection, fuzzing (a scorer LM) and embedding (no generation).

Paulo et al. 2024 (arXiv:2410.13928 §3), as in EleutherAI's delphi:

- **detection**: the scorer LM reads the explanation and numbered contexts, a shuffled mix of activating
  ones (quantile samples, never shown to the explainer) and random non-activating ones, and answers 1/0 per
  context: does the latent fire in it?
- **fuzzing**: activating contexts with tokens marked <<like this>>: half at the tokens where the latent
  fires, half at as many random tokens where it does not; the LM answers 1/0 per context: is the marking
  the one the explanation describes?

Both are scored by balanced accuracy over the parsed answers,

    BA = ½ (TP / (TP + FN) + TN / (TN + FP)),

which is 0.5 for a constant or random answer whatever the class balance (NaN when a class has no parsed
item). An answer that `parse_labels` cannot read leaves its contexts unscored; they are counted.

With log-probability scoring (delphi's choice for local scorers) each context is its own Yes / No chat
(`yes_no_prompts`) and the scorer's answer is p = P(Yes) / (P(Yes) + P(No)) of its next token: nothing to
parse. The score is then BA of the predictions p > ½, and the AUROC of p (below), which also credits a
scorer whose p ranks the contexts right while sitting on one side of ½.

- **embedding**: the explanation and the contexts (unmarked) are embedded by a sentence embedder (MiniLM);
  the score is the AUROC of cos(explanation, context) for activating (positive) vs non-activating contexts,

    AUROC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻) = (R⁺ − n⁺(n⁺ + 1)/2) / (n⁺ n⁻),

  R⁺ the sum of the positives' ranks among all scores (ties get their average rank; Mann–Whitney U).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from saelab.interp.contexts import Example
from saelab.interp.explain import numbered
from saelab.interp.prompts import Chat, render

SCORERS = ("detection", "fuzzing", "embedding")


@dataclass(frozen=True)
class Item:
    """One context as a scorer sees it, and the answer that would be right (1 or 0)."""

    text: str
    label: int


# ---------------------------------------------------------------------- items
def detection_items(
    activating: Sequence[Example], non_activating: Sequence[Example], rng: random.Random
) -> list[Item]:
    """Unmarked activating (label 1) and non-activating (label 0) contexts, shuffled."""
    items = [Item(e.text(), 1) for e in activating] + [Item(e.text(), 0) for e in non_activating]
    rng.shuffle(items)
    return items


def fuzzing_items(activating: Sequence[Example], rng: random.Random, mark_frac: float = 0.0) -> list[Item]:
    """Activating contexts, ⌈n/2⌉ marked at their firing tokens (label 1) and the rest at as many random
    non-firing tokens (label 0); a context with no non-firing token cannot be mis-marked and is dropped."""
    order = list(activating)
    rng.shuffle(order)
    n_right = math.ceil(len(order) / 2)
    items = []
    for i, e in enumerate(order):
        flags = e.flags(mark_frac)
        if i < n_right:
            items.append(Item(e.text(flags), 1))
            continue
        quiet = [t for t, f in enumerate(flags) if not f]
        if not quiet:
            continue
        wrong = set(rng.sample(quiet, min(max(1, sum(flags)), len(quiet))))
        items.append(Item(e.text([t in wrong for t in range(len(flags))]), 0))
    rng.shuffle(items)
    return items


def classifier_prompts(
    kind: str, explanation: str, items: Sequence[Item], per_prompt: int, prompts: str | None = None
) -> list[tuple[Chat, list[int]]]:
    """The chats of scorer `kind` ("detection" or "fuzzing"), `per_prompt` items each, with their labels."""
    out = []
    for i in range(0, len(items), max(1, per_prompt)):
        part = items[i : i + per_prompt]
        chat = render(
            kind, prompts, explanation=explanation, examples=numbered([t.text for t in part]), n=len(part)
        )
        out.append((chat, [t.label for t in part]))
    return out


def yes_no_prompts(
    kind: str, explanation: str, items: Sequence[Item], prompts: str | None = None
) -> list[tuple[Chat, int]]:
    """One Yes / No chat per item (prompt entry `<kind>_logprob`), with the item's label."""
    return [
        (render(f"{kind}_logprob", prompts, explanation=explanation, example=t.text.strip()), t.label)
        for t in items
    ]


# ---------------------------------------------------------------------- parsing answers
_VALUE = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0}
_NUMBERED = re.compile(r"(?:example|snippet)?\s*#?(\d+)\s*[:.)=\-]\s*(yes|no|true|false|1|0)\b")


def parse_labels(answer: str, n: int) -> list[int] | None:
    """The n 0/1 answers in a scorer's reply, or None when it holds no reading of exactly n answers.

    Tried in order: the first bracketed list of n values (`[1, 0, 1]`, also yes/no/true/false); numbered
    answers ("1: yes", "Example 2 - 0", one per number 1..n); exactly n standalone 0/1 digits; a bare
    string of n digits ("101"); exactly n yes/no words.
    """
    text = answer.lower()
    for m in re.finditer(r"\[([^\[\]]*)\]", text):
        vals = re.findall(r"[a-z0-9]+", m.group(1))
        if len(vals) == n and all(v in _VALUE for v in vals):
            return [_VALUE[v] for v in vals]
    found: dict[int, int] = {}
    for m in _NUMBERED.finditer(text):
        i = int(m.group(1))
        if 1 <= i <= n:
            found.setdefault(i, _VALUE[m.group(2)])
    if len(found) == n:
        return [found[i] for i in range(1, n + 1)]
    bits = re.findall(r"(?<![\w.])[01](?![\w.])", text)
    if len(bits) == n:
        return [int(b) for b in bits]
    compact = re.fullmatch(r"\W*([01]+)\W*", text)
    if compact and len(compact.group(1)) == n:
        return [int(b) for b in compact.group(1)]
    words = re.findall(r"\b(yes|no|true|false)\b", text)
    if len(words) == n:
        return [_VALUE[w] for w in words]
    return None


# ---------------------------------------------------------------------- metrics
def balanced_accuracy(truth: Sequence[int], pred: Sequence[int]) -> float:
    """½ (TPR + TNR); NaN when either class is absent from `truth`."""
    t, p = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"truth and predictions differ in length: {t.shape} vs {p.shape}.")
    if t.all() or not t.any():
        return float("nan")
    return 0.5 * (float(p[t].mean()) + float((~p[~t]).mean()))


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of `scores` for `labels` (Mann–Whitney, ties ½); NaN without both classes."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)  # average ranks for ties
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class ClassifierScore:
    """A detection or fuzzing result for one latent."""

    score: float  # balanced accuracy over the parsed items
    n_items: int
    n_unparsed: int  # items whose prompt's answer could not be read
    truth: list[int]
    pred: list[int | None]
    auroc: float = float("nan")  # AUROC of P(Yes) (log-probability scoring only)
    p_yes: list[float] | None = None  # P(Yes) per item (log-probability scoring only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "auroc": self.auroc,
            "n_items": self.n_items,
            "n_unparsed": self.n_unparsed,
        }


def score_answers(labels: Sequence[Sequence[int]], answers: Sequence[str]) -> ClassifierScore:
    """Balanced accuracy of the scorer's `answers`, one per prompt, against each prompt's item `labels`."""
    truth: list[int] = []
    pred: list[int | None] = []
    for lab, ans in zip(labels, answers, strict=True):
        got = parse_labels(ans, len(lab))
        truth += list(lab)
        pred += list(got) if got is not None else [None] * len(lab)
    seen = [(t, p) for t, p in zip(truth, pred, strict=True) if p is not None]
    ba = balanced_accuracy([t for t, _ in seen], [p for _, p in seen]) if seen else float("nan")
    return ClassifierScore(ba, len(truth), len(truth) - len(seen), truth, pred)


def score_probabilities(
    labels: Sequence[int], p_yes: Sequence[float], threshold: float = 0.5
) -> ClassifierScore:
    """Balanced accuracy of the predictions p > `threshold`, and AUROC of p, for one P(Yes) per item."""
    truth = [int(t) for t in labels]
    p = [float(v) for v in p_yes]
    if len(p) != len(truth):
        raise ValueError(f"{len(p)} probabilities for {len(truth)} items.")
    pred: list[int | None] = [int(v > threshold) for v in p]
    ba = balanced_accuracy(truth, [int(v > threshold) for v in p]) if truth else float("nan")
    return ClassifierScore(ba, len(truth), 0, truth, pred, auroc=auroc(p, truth), p_yes=p)


def embedding_score(
    embedder: Any, explanation: str, activating: Sequence[Example], non_activating: Sequence[Example]
) -> float:
    """AUROC of cos(embed(explanation), embed(context)) for activating vs non-activating contexts.

    `embedder.encode(texts) -> [n, dim]` unit vectors (`saelab.hosts.embedder.SentenceEmbedder`).
    """
    texts = [e.text() for e in (*activating, *non_activating)]
    if not explanation or not texts:
        return float("nan")
    v = np.asarray(embedder.encode([explanation, *texts]), dtype=np.float64)  # (1 + n, dim)
    v /= np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)
    cos = v[1:] @ v[0]  # (n,)
    return auroc(cos, [1] * len(activating) + [0] * len(non_activating))
