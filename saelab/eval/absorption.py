"""`absorption`: feature absorption, on planted ground truth or by SAEBench's first-letter spelling task.

Chanin et al. 2024, "A is for Absorption" (arXiv:2409.14507): when one feature implies another (the token
" short" implies "starts with S"), a sparse SAE saves L0 by letting the specific latent absorb the general
direction, so the general latent is silent exactly where the specific one fires.

**Synthetic source** (`source.features`, planted parent/child features): the ground-truth absorption of
`saelab.analysis.absorption.synthetic_absorption` on `n_samples` fresh rows (metric `absorption`).

**Text source with a causal-LM host** (`source.host.tokenizer`): the first-letter task as SAEBench runs it
(`sae_bench/evals/absorption/`: vocab, prompting, probing, k_sparse_probing, feature_absorption_calculator):

1. Words. Every vocabulary token that decodes to " w" (one leading space, then w) where w is all ASCII
   lowercase letters with len(w) ≥ `min_word_len`, w's first letter is in `letters` and w is not one
   of the in-context examples; kept only if the prompt tokenizes with w in exactly one token (the
   tokens of head + " w" are those of head plus one, and start the tokens of the whole prompt). Per
   letter: the first `max_words_per_letter` words so kept, in an order of its sorted words drawn by a
   generator seeded by (seed, letter); then split into probe-train and test words (a seeded
   `probe_test_frac` share, at least one, goes to test).
2. Activations. The prompt is `icl_examples` as "{template with ' example'} E" lines, then the template
   with {word} = " w" (SAEBench's default "{word} has the first letter:"). The host runs [BOS] + the
   prompt's tokens up to the word token (a causal model's activation there does not depend on what
   follows), right-padded, and h is the hook activation at the word token.
3. Ground-truth probes: one-vs-rest logistic regression on h, z_ℓ = w_ℓ·h + b_ℓ, fit on the train words
   with BCE (positives weighted by n_neg/n_pos, as SAEBench) + `probe_l2`/2·‖w_ℓ‖², full batch L-BFGS.
   A word is a probe true positive for its letter ℓ when z_ℓ > 0.
4. Main latents (k-sparse probing, after Gurnee et al. 2023). Latents are ranked per letter by the
   weights of an L1-regularised logistic probe on the SAE codes of the train words (SAEBench; or by
   mean code difference positives − negatives, `latent_ranking="mean_diff"`). For k = 1..`max_k` a
   logistic probe (class-balanced, L2 with C = 1, as sklearn's default) on the top-k latents is fit on
   train words and its F1 (score > 0) measured on test words; the main latents are the top-k of the
   last k whose F1 beats the best so far by more than `f1_jump_threshold` (k = 1 always does); a
   letter's probes stop at its first k without such a jump (SAEBench fits all k, to the same result).
5. Per test word that is a probe true positive for its letter ℓ, with a = s·h the activation in the SAE's
   units (s = `source.act_scale`), f the SAE codes of a, p̂ = w_ℓ/‖w_ℓ‖ and c_i = cos(W_dec,i, p̂):
       P = a·p̂,   π_i = f_i·c_i,   M = Σ_{i ∈ main} π_i,
       A = Σ of the `n_absorbing_latents` largest π_i over i ∉ main with c_i ≥ `absorber_cos_threshold`, π_i > 0,
       absorption_fraction = 0                                   if M ≥ P or A/P < τ (τ = `full_absorption_threshold`),
                             1                                   elif M ≤ 0,
                             min(A, P−M) / (min(A, P−M) + M)     otherwise;
       full_absorption = every main latent silent (|f_i| < 1e-8), and the latent j of largest π_j has
                         c_j ≥ `full_absorption_cos_threshold` and π_j/P ≥ τ (with P > 0).
   P and π are both in SAE units, so neither score depends on s.
6. Per letter, each score averaged over its probe true positives; `mean_absorption_fraction` and
   `mean_full_absorption` average the letters that have any, and `absorption` = mean_absorption_fraction
   so comparison tables have one column across sources.

Differences from SAEBench, all for cost on CPUs: a capped word list instead of the whole vocabulary, a
short fixed in-context prefix instead of 10 examples drawn per prompt (so the probe and the absorption
step read the same activations), a stratified word split, full-batch L-BFGS/Adam instead of sklearn and
minibatch Adam. The host forwards and the probes depend only on the host, so they are memoised per
process (`host_part`): several SAEs evaluated in one run pay for them once.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from saelab.analysis.absorption import synthetic_absorption
from saelab.eval.base import EvalResult
from saelab.hosts.base import right_padded
from saelab.types import SAELike

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SAEBENCH_TEMPLATE = "{word} has the first letter:"
DEFAULT_ICL = ("apple", "river", "house")
_SILENT = 1e-8  # |f_i| below this counts as "did not fire" (SAEBench's EPS)
_MEMO_SIZE = 4  # host parts kept per process (one per host × settings)


# ---------------------------------------------------------------------------------------------- words
def vocabulary_words(tokenizer, min_word_len: int = 2) -> list[str]:
    """Sorted distinct w such that a single non-special token decodes to " " + w, w ASCII lowercase letters.

    SentencePiece tokens ("▁cat") decode without their space; their "▁" marks it instead.
    """
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = sorted(i for i in vocab.values() if i not in special)
    texts = tokenizer.batch_decode([[i] for i in ids])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out = set()
    for text, piece in zip(texts, pieces):
        if piece and str(piece).startswith("▁") and not text.startswith(" "):
            text = " " + text
        w = text[1:]
        if text[:1] == " " and len(w) >= min_word_len and w.isascii() and w.isalpha() and w.islower():
            out.add(w)
    return sorted(out)


def icl_prefix(template: str, examples: tuple[str, ...] | list[str]) -> str:
    """The in-context lines, e.g. " apple has the first letter: A\\n" per example (SAEBench's format)."""
    return "".join(f"{template.format(word=' ' + w)} {w[0].upper()}\n" for w in examples)


def prompt_tokens(
    tokenizer, words: list[str], template: str, examples: tuple[str, ...] | list[str], bos_id: int | None
) -> dict[str, list[int]]:
    """word → [BOS] + prompt tokens up to the word's token, for the words the prompt keeps in one token."""
    cut = template.index("{word}")
    head = icl_prefix(template, examples) + template[:cut].format()
    tail = template[cut + len("{word}") :].format()

    def tok(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    h = tok([head])[0] if head else []
    with_word = tok([head + " " + w for w in words])
    whole = tok([head + " " + w + tail for w in words])
    bos = [] if bos_id is None else [int(bos_id)]
    out = {}
    for w, hw, full in zip(words, with_word, whole):
        if len(hw) == len(h) + 1 and hw[: len(h)] == h and full[: len(hw)] == hw:
            out[w] = bos + list(hw)
    return out


def pick_words(
    candidates: list[str],
    letters: str,
    max_words_per_letter: int,
    seed: int,
    keep: Callable[[list[str]], set[str]] | None = None,
) -> dict[str, list[str]]:
    """Per letter, the first `max_words_per_letter` of its sorted candidates in a seeded order that `keep`
    accepts (all when None), sorted.

    Each letter has its own generator (seed, letter), so restricting `letters` does not change the words
    of the others; `keep` (the prompt check) is asked only about as many words as are needed.
    """
    out = {}
    for letter in letters:
        ws = sorted(w for w in candidates if w[0] == letter)
        order = random.Random(f"{seed}:{letter}").sample(ws, len(ws))
        chosen: list[str] = []
        i = 0
        while len(chosen) < max_words_per_letter and i < len(order):
            batch = order[i : i + 2 * (max_words_per_letter - len(chosen)) + 8]
            i += len(batch)
            ok = set(batch) if keep is None else keep(batch)
            chosen.extend(w for w in batch if w in ok)
        out[letter] = sorted(chosen[:max_words_per_letter])
    return out


def split_words(
    by_letter: dict[str, list[str]], letters: str, probe_test_frac: float, seed: int
) -> tuple[list[str], Int[Tensor, " n"], Bool[Tensor, " n"]]:
    """(words, letter index of each, is-test mask): per letter a seeded `probe_test_frac` share (at least
    one word, at most all but one) is held out from the probes."""
    words, labels, test = [], [], []
    for li, letter in enumerate(letters):
        ws = by_letter.get(letter, [])
        order = random.Random(f"{seed}:{letter}:split").sample(ws, len(ws))
        n_test = min(max(1, round(probe_test_frac * len(ws))), len(ws) - 1)
        held_out = set(order[:n_test])
        for w in ws:
            words.append(w)
            labels.append(li)
            test.append(w in held_out)
    return words, torch.tensor(labels, dtype=torch.long), torch.tensor(test, dtype=torch.bool)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the small probe fits on one thread: on tensors this size, thread hand-offs cost more than the work
    (an L-BFGS step of the letter probe: 0.9 ms on one thread, ~25 ms on two busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def shared_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence starts with, leaving at least one token of each after it."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        while n > 0 and s[:n] != first[:n]:
            n -= 1
    return max(n, 0)


def word_activations(
    host,
    seqs: list[list[int]],
    batch_size: int = 32,
    desc: str = "absorption: host forwards",
    share_prefix: bool = True,
    progress: bool = True,
) -> Float[Tensor, "n d_in"]:
    """Hook activation at each sequence's last token (the word), `batch_size` right-padded rows per forward.

    Every prompt starts with the same in-context lines; with `share_prefix` (and a Hugging Face host that
    exposes `model` and `hook_module`) their key/value cache is computed once and each batch runs only its
    own last tokens, checked on the first batch against the full forward (else the full forward is used).
    """
    p = shared_prefix_len(seqs)
    if share_prefix and p >= 2 and hasattr(host, "model") and hasattr(host, "hook_module"):
        cached = _suffix_activations(host, seqs, p, batch_size, desc)
        if cached is not None:
            return cached
    out: list[Tensor] = []
    bar = tqdm(total=len(seqs), desc=desc, unit="word", leave=False, disable=not progress)
    try:
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            ids, att = right_padded(chunk, host.pad_id)
            h = host.activations(
                ids, att
            )  # (B, T, d_in); padding sits after each word, out of its causal past
            last = torch.tensor([len(s) - 1 for s in chunk], device=h.device)
            out.append(h[torch.arange(len(chunk), device=h.device), last].float().cpu())  # (B, d_in)
            bar.update(len(chunk))
    finally:
        bar.close()
    return torch.cat(out)


@torch.no_grad()
def _suffix_activations(host, seqs: list[list[int]], p: int, batch_size: int, desc: str) -> Tensor | None:
    """`word_activations` with the shared first `p` tokens run once; None when the cached path disagrees
    with the full forward on the first batch (a model whose cache or positions work differently)."""
    import copy
    import inspect

    from transformers import DynamicCache

    from saelab.hosts.base import run_until

    model, hook = host.model, host.hook_module
    dev = next(model.parameters()).device
    prefix = torch.tensor([seqs[0][:p]], device=dev)
    cache = DynamicCache()
    # the cache argument's name: `cache` in recent transformers, `past_key_values` before
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    run_until(
        model,
        hook,
        input_ids=prefix,
        attention_mask=torch.ones_like(prefix),
        past_key_values=cache,
        use_cache=True,
    )
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s) - p, []).append(i)
    out = torch.empty(len(seqs), int(host.d_in))
    bar = tqdm(total=len(seqs), desc=desc, unit="word", leave=False)
    checked = False
    try:
        for length, idx in by_len.items():
            for j in range(0, len(idx), batch_size):
                rows = idx[j : j + batch_size]
                c = copy.deepcopy(cache)
                c.batch_repeat_interleave(len(rows))
                ids = torch.tensor([seqs[i][p:] for i in rows], device=dev)  # (B, length), no padding
                att = torch.ones(len(rows), p + length, dtype=torch.long, device=dev)
                h = run_until(model, hook, input_ids=ids, attention_mask=att, **{kw: c}, use_cache=True)
                last = h[:, -1].float().cpu()  # (B, d_in)
                if not checked:
                    full = word_activations(
                        host, [seqs[i] for i in rows[:2]], 2, share_prefix=False, progress=False
                    )
                    if not torch.allclose(
                        last[: len(full)], full, rtol=1e-3, atol=1e-4 * float(full.abs().max())
                    ):
                        return None
                    checked = True
                out[rows] = last
                bar.update(len(rows))
    finally:
        bar.close()
    return out


# ---------------------------------------------------------------------------------------------- probes
def _bce(z: Tensor, y: Tensor) -> Tensor:
    """Elementwise −[y·log σ(z) + (1−y)·log(1−σ(z))] = softplus(z) − y·z (torch's unreduced BCE is slow on CPU)."""
    return F.softplus(z) - y * z


@dataclass(frozen=True)
class LetterProbe:
    """One-vs-rest letter probes z = h·Wᵀ + b: row ℓ of `weight` is letter ℓ's probe direction (host units)."""

    weight: Float[Tensor, "n_letters d_in"]
    bias: Float[Tensor, " n_letters"]

    def logits(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n n_letters"]:
        return x.float() @ self.weight.T.float() + self.bias.float()


def fit_logistic(
    x: Float[Tensor, "g_or_1 n k"],
    y: Bool[Tensor, "g n"],
    sample_weight: Float[Tensor, "g n"],
    l2: float,
    max_iter: int = 200,
) -> tuple[Float[Tensor, "g k"], Float[Tensor, " g"]]:
    """g independent logistic regressions, min Σ_i s_gi·BCE(x_gi·w_g + b_g, y_gi) + l2/2·‖w_g‖², by L-BFGS.

    `x` is shared by all g problems when its first dimension is 1. float64 and zero init: deterministic.
    """
    x, target, s = x.double(), y.double(), sample_weight.double()
    g, k = y.shape[0], x.shape[-1]
    scale = float(s.sum(1).mean().clamp_min(1e-12))
    w = torch.zeros(g, k, 1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(g, 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        z = torch.matmul(x, w).squeeze(-1) + b  # (g, n)
        loss = (s * _bce(z, target)).sum() + 0.5 * l2 * w.pow(2).sum()
        loss = loss / scale  # same minimiser; keeps the L-BFGS tolerances independent of n
        loss.backward()
        return loss

    with torch.enable_grad(), one_thread():
        opt.step(closure)
    return w.detach().squeeze(-1), b.detach().squeeze(-1)


def train_letter_probe(
    acts: Float[Tensor, "n d_in"], labels: Int[Tensor, " n"], n_letters: int, l2: float = 0.1
) -> LetterProbe:
    """SAEBench's ground-truth probe: BCE with positives weighted n_neg/n_pos (mean over words) + l2/2·‖w‖².

    Fit on (h − μ)/σ (σ² = mean squared norm per dimension) for conditioning and a scale-free `l2`;
    mapped back, w = w'/σ and b = b' − w·μ give the same logits on h.
    """
    x = acts.double()
    mu = x.mean(0)
    sigma = (x - mu).pow(2).sum(1).mean().div(x.shape[1]).sqrt().clamp_min(1e-12)
    xs = ((x - mu) / sigma)[None]  # (1, n, d_in), shared by all letters
    y = labels[None, :] == torch.arange(n_letters)[:, None]  # (L, n)
    n_pos = y.sum(1, keepdim=True).double()
    pos_weight = (y.shape[1] - n_pos) / n_pos.clamp_min(1)
    s = torch.where(y, pos_weight, torch.ones_like(pos_weight)) / y.shape[1]
    w, b = fit_logistic(xs, y, s, l2)
    w = w / sigma
    return LetterProbe(weight=w.float(), bias=(b - w @ mu).float())


def binary_f1(pred: Bool[Tensor, "g n"], y: Bool[Tensor, "g n"]) -> Float[Tensor, " g"]:
    """F1 = 2TP / (2TP + FP + FN) per row (0 when there is nothing to find and nothing predicted)."""
    tp = (pred & y).sum(-1).double()
    denom = 2 * tp + (pred & ~y).sum(-1) + (~pred & y).sum(-1)
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def probe_metrics(
    probe: LetterProbe, acts: Float[Tensor, "n d_in"], labels: Int[Tensor, " n"], n_letters: int
) -> dict[str, list[float]]:
    """Per letter F1, accuracy, precision and recall of z_ℓ > 0 on the given words."""
    pred = (probe.logits(acts) > 0).T  # (L, n)
    y = labels[None, :] == torch.arange(n_letters)[:, None]
    tp = (pred & y).sum(1).double()
    return {
        "f1": binary_f1(pred, y).tolist(),
        "accuracy": (pred == y).double().mean(1).tolist(),
        "precision": (tp / pred.sum(1).clamp_min(1)).tolist(),
        "recall": (tp / y.sum(1).clamp_min(1)).tolist(),
    }


# ---------------------------------------------------------------------------------------------- SAE side
@torch.no_grad()
def sae_codes(sae: SAELike, x: Float[Tensor, "n d_in"], chunk: int = 1024) -> Tensor:
    """The SAE codes of x as a sparse COO [n, d_sae] tensor on the CPU (wide SAEs stay cheap)."""
    dev = sae.W_dec.device
    rows, cols, vals = [], [], []
    for i in range(0, x.shape[0], chunk):
        f = sae(x[i : i + chunk].to(dev)).codes.float().cpu()  # (B, d_sae)
        r, c = f.nonzero(as_tuple=True)
        rows.append(r + i)
        cols.append(c)
        vals.append(f[r, c])
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    out = torch.sparse_coo_tensor(idx, torch.cat(vals), (x.shape[0], int(sae.d_sae)), check_invariants=False)
    return out.coalesce()


def rank_latents(
    codes: Tensor,
    labels: Int[Tensor, " n"],
    n_letters: int,
    method: str = "l1_probe",
    l1: float = 0.01,
    steps: int = 300,
) -> Float[Tensor, "n_letters d_sae"]:
    """Per letter a score for each latent; higher = more predictive of the letter (top-k, not |·|, as SAEBench).

    "l1_probe": SAEBench's weights of one-vs-rest logistic probes on the codes, BCE (pos_weight n_neg/n_pos)
    + l1·mean_ℓ ‖w_ℓ‖₁ + 1e-6 L2, full-batch Adam with lr 1e-2 decaying to 1e-5. "mean_diff": mean code
    on the letter's words minus mean code on the others.
    """
    y = labels[None, :] == torch.arange(n_letters)[:, None]  # (L, n)
    if method == "mean_diff":
        yf = y.float()
        dense_sum = torch.sparse.mm(codes.t(), yf.T).T  # (L, d_sae): Σ over the letter's words
        total = torch.sparse.sum(codes, 0).to_dense()
        n_pos = yf.sum(1, keepdim=True)
        return dense_sum / n_pos.clamp_min(1) - (total - dense_sum) / (y.shape[1] - n_pos).clamp_min(1)
    if method != "l1_probe":
        raise ValueError(f"latent_ranking must be 'l1_probe' or 'mean_diff', got {method!r}.")
    d_sae = codes.shape[1]
    target = y.T.float()  # (n, L)
    n_pos = target.sum(0)
    pos_weight = (target.shape[0] - n_pos) / n_pos.clamp_min(1)
    weight = torch.where(target > 0, pos_weight, 1.0)  # (n, L): BCE's pos_weight as a sample weight
    w = torch.zeros(d_sae, n_letters, requires_grad=True)
    b = torch.zeros(n_letters, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(1e-5 / 1e-2) / steps))
    with torch.enable_grad(), one_thread():
        for _ in range(steps):
            opt.zero_grad()
            z = torch.sparse.mm(codes, w) + b  # (n, L)
            loss = (_bce(z, target) * weight).mean()
            loss = loss + l1 * w.abs().sum(0).mean()
            loss.backward()
            opt.step()
            sched.step()
    return w.detach().T


def _columns(codes: Tensor, rows: Tensor, cols: Tensor) -> Float[Tensor, "n_rows n_cols"]:
    return codes.index_select(0, rows).index_select(1, cols).to_dense()


def main_latents(
    codes: Tensor,
    labels: Int[Tensor, " n"],
    is_test: Bool[Tensor, " n"],
    n_letters: int,
    max_k: int = 10,
    f1_jump_threshold: float = 0.03,
    method: str = "l1_probe",
) -> tuple[list[list[int]], list[list[float]]]:
    """k-sparse probing: each letter's main latents, and the test F1 of its k-sparse probes for k = 1, 2, ...

    A letter's k-sparse probes are fit only while its F1 keeps jumping (the main set is decided by then),
    so its F1 list ends at the first k that did not add latents, or at `max_k`.
    """
    train, test = (~is_test).nonzero().squeeze(1), is_test.nonzero().squeeze(1)
    ranking = rank_latents(_rows(codes, train), labels[train], n_letters, method)
    max_k = min(int(max_k), codes.shape[1])
    top = ranking.topk(max_k, dim=1).indices  # (L, max_k)
    used = top.unique()
    pos = torch.searchsorted(used, top)  # top as positions within `used`
    z_tr, z_te = _columns(codes, train, used), _columns(codes, test, used)  # (n_train, u), (n_test, u)
    y_tr = labels[train][None, :] == torch.arange(n_letters)[:, None]  # (L, n_train)
    y_te = labels[test][None, :] == torch.arange(n_letters)[:, None]
    n, n_pos = y_tr.shape[1], y_tr.sum(1, keepdim=True).double()
    # sklearn's class_weight="balanced": n / (2·n_class) per sample
    s = torch.where(y_tr, n / (2 * n_pos.clamp_min(1)), n / (2 * (n - n_pos).clamp_min(1)))
    f1: list[list[float]] = [[] for _ in range(n_letters)]
    best = torch.full((n_letters,), -math.inf, dtype=torch.float64)
    k_main = torch.ones(n_letters, dtype=torch.long)
    active = torch.arange(n_letters)  # letters whose F1 jumped at every k so far
    for k in range(1, max_k + 1):
        sel = pos[active, :k]  # (A, k)
        x_tr = z_tr[:, sel].permute(1, 0, 2)  # (A, n_train, k)
        w, b = fit_logistic(x_tr, y_tr[active], s[active], l2=1.0)
        score = torch.einsum("ank,ak->an", z_te[:, sel].permute(1, 0, 2).double(), w) + b[:, None]
        f1_k = binary_f1(score > 0, y_te[active])  # (A,)
        for li, v in zip(active.tolist(), f1_k.tolist()):
            f1[li].append(round(v, 6))
        jumped = f1_k > best[active] + f1_jump_threshold
        best[active[jumped]] = f1_k[jumped]
        k_main[active[jumped]] = k
        active = active[jumped]
        if active.numel() == 0:
            break
    return [top[li, : int(k_main[li])].tolist() for li in range(n_letters)], f1


def _rows(codes: Tensor, rows: Tensor) -> Tensor:
    return codes.index_select(0, rows).coalesce()


def word_absorption(
    codes: Float[Tensor, "n d_sae"],
    proj: Float[Tensor, " n"],
    cos: Float[Tensor, " d_sae"],
    main: list[int],
    full_absorption_threshold: float = 0.4,
    n_absorbing_latents: int = 3,
    absorber_cos_threshold: float = 0.1,
    full_absorption_cos_threshold: float = 0.025,
) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
    """SAEBench's absorption fraction and full absorption of n words of one letter (module docstring, step 5).

    `codes` are the words' SAE codes, `proj` = P = a·p̂, `cos` = c_i = cos(W_dec,i, p̂), `main` the letter's
    main latents.
    """
    f, p, c = codes.double(), proj.double(), cos.double()
    pi = f * c  # (n, d_sae): π_i = f_i·c_i
    is_main = torch.zeros(f.shape[1], dtype=torch.bool)
    is_main[main] = True
    m = pi[:, is_main].sum(1)
    absorbers = torch.where(~is_main & (c >= absorber_cos_threshold) & (pi > 0), pi, torch.zeros_like(pi))
    a = absorbers.topk(min(n_absorbing_latents, f.shape[1]), dim=1).values.sum(1)
    safe_p = torch.where(p > 0, p, torch.ones_like(p))
    zero = (p <= 0) | (m >= p) | (a / safe_p < full_absorption_threshold)
    absorbed = torch.minimum(a, p - m)
    partial = (absorbed / (absorbed + m).clamp_min(1e-30)).clamp(0, 1)
    fraction = torch.where(zero, torch.zeros_like(p), torch.where(m <= 0, torch.ones_like(p), partial))
    top_pi, top_j = pi.max(1)
    full = (
        (f[:, is_main].abs() < _SILENT).all(1)
        & (c[top_j] >= full_absorption_cos_threshold)
        & (p > 0)
        & (top_pi / safe_p >= full_absorption_threshold)
    )
    return fraction.float(), full


@dataclass(frozen=True)
class FirstLetterAbsorption:
    """What `first_letter_absorption` returns: the three scores, per-letter results and per-word values."""

    mean_absorption_fraction: float
    mean_full_absorption: float
    mean_num_split_features: float
    per_letter: list[dict[str, Any]]  # one dict per letter index
    fraction: Float[Tensor, " n"]  # per word; NaN where the word is not a scored probe true positive
    full: Bool[Tensor, " n"]


@torch.no_grad()
def first_letter_absorption(
    acts: Float[Tensor, "n d_in"],
    labels: Int[Tensor, " n"],
    is_test: Bool[Tensor, " n"],
    probe: LetterProbe,
    sae: SAELike,
    act_scale: float = 1.0,
    max_k: int = 10,
    f1_jump_threshold: float = 0.03,
    full_absorption_threshold: float = 0.4,
    n_absorbing_latents: int = 3,
    absorber_cos_threshold: float = 0.1,
    full_absorption_cos_threshold: float = 0.025,
    latent_ranking: str = "l1_probe",
) -> FirstLetterAbsorption:
    """First-letter absorption of `sae` from host activations at word tokens (module docstring, steps 4–6).

    `acts` are host activations h (the SAE reads s·h, s = `act_scale`), `labels` each word's letter index
    (0..n_letters−1, n_letters = probe.weight.shape[0]), `is_test` marks the words not used to fit probes.
    """
    n_letters = probe.weight.shape[0]
    a = acts.float() * float(act_scale)  # (n, d_in) in the SAE's units
    codes = sae_codes(sae, a)
    main, f1 = main_latents(codes, labels, is_test, n_letters, max_k, f1_jump_threshold, latent_ranking)
    z = probe.logits(acts)  # (n, L): the probe reads host units
    directions = F.normalize(probe.weight.float(), dim=1)  # (L, d_in): p̂_ℓ
    W_dec = sae.W_dec.detach().float().cpu()
    cos = F.normalize(W_dec, dim=1) @ directions.T  # (d_sae, L): c_i per letter
    fraction = torch.full((acts.shape[0],), float("nan"))
    full = torch.zeros(acts.shape[0], dtype=torch.bool)
    per_letter, frac_means, full_means = [], [], []
    for li in range(n_letters):
        rows = (is_test & (labels == li) & (z[:, li] > 0)).nonzero().squeeze(1)  # probe true positives
        entry: dict[str, Any] = {
            "n_probe_true_positives": int(rows.numel()),
            "main_latents": main[li],
            "k_sparse_f1": f1[li],
            "mean_absorption_fraction": None,
            "full_absorption_rate": None,
            "n_full_absorption": 0,
        }
        if rows.numel():
            fr, fu = word_absorption(
                _rows(codes, rows).to_dense(),
                a[rows] @ directions[li],
                cos[:, li],
                main[li],
                full_absorption_threshold,
                n_absorbing_latents,
                absorber_cos_threshold,
                full_absorption_cos_threshold,
            )
            fraction[rows], full[rows] = fr, fu
            entry.update(
                mean_absorption_fraction=float(fr.mean()),
                full_absorption_rate=float(fu.float().mean()),
                n_full_absorption=int(fu.sum()),
            )
            frac_means.append(float(fr.mean()))
            full_means.append(float(fu.float().mean()))
        per_letter.append(entry)
    nan = float("nan")
    return FirstLetterAbsorption(
        mean_absorption_fraction=sum(frac_means) / len(frac_means) if frac_means else nan,
        mean_full_absorption=sum(full_means) / len(full_means) if full_means else nan,
        mean_num_split_features=sum(len(m) for m in main) / max(1, len(main)),
        per_letter=per_letter,
        fraction=fraction,
        full=full,
    )


# ---------------------------------------------------------------------------------------------- host side
@dataclass(frozen=True)
class HostPart:
    """Everything that depends only on the host: the words, their activations, the probe and its test scores."""

    words: list[str]
    labels: Int[Tensor, " n"]
    is_test: Bool[Tensor, " n"]
    acts: Float[Tensor, "n d_in"]
    probe: LetterProbe
    probe_test: dict[str, list[float]]
    seconds: float


_MEMO: OrderedDict[str, HostPart] = OrderedDict()


def _has(obj: Any, name: str) -> bool:
    """Whether obj has attribute `name`, without evaluating a property (a host's loads its model)."""
    return name in getattr(obj, "__dict__", {}) or hasattr(type(obj), name)


class Absorption:
    """`absorption`: ground-truth absorption on the synthetic source, first-letter absorption on text.

    See the module docstring for both definitions. Metrics: `absorption` on either source; on text also
    `mean_absorption_fraction` (= absorption), `mean_full_absorption` and `mean_num_split_features`.

    Args:
        n_samples: synthetic source: fresh rows drawn from its generative model.
        sample_index: synthetic source: their batch index (away from the training and validation ones).
        letters: text: the first letters probed (default all 26).
        min_word_len: text: shortest word kept.
        min_words_per_letter: text: a letter with fewer usable words stops the evaluation.
        max_words_per_letter: text: cap per letter (a seeded sample of the sorted words).
        prompt_template: text: the prompt; {word} becomes the word with its leading space (" cat").
        icl_examples: text: in-context example words before the prompt (empty: none).
        probe_test_frac: text: share of each letter's words held out from the probes.
        probe_l2: text: L2 strength of the ground-truth probes (on scale-normalised activations).
        max_k: text: largest k of the k-sparse probes.
        f1_jump_threshold: text: F1 gain over the best smaller k that adds latents to the main set.
        full_absorption_threshold: text: τ, the share of the probe projection absorbing latents must carry.
        n_absorbing_latents: text: how many latents may share the absorption (SAEBench's top-N, 3).
        absorber_cos_threshold: text: least cos(W_dec,i, probe) of an absorbing latent (fraction).
        full_absorption_cos_threshold: text: least cos of the single absorbing latent (full absorption).
        latent_ranking: text: "l1_probe" (SAEBench) or "mean_diff" for the k-sparse latent order.
        batch_size: text: prompts per host forward.
        seed: text: word sampling and split.
        plot: write absorption.png (per-letter bars) on text sources.
    """

    name = "absorption"
    needs: tuple[str, ...] = ()  # either `features` or a host with a tokenizer: see applies_to

    def __init__(
        self,
        n_samples: int = 8192,
        sample_index: int = -1000,
        letters: str | list[str] = LETTERS,
        min_word_len: int = 2,
        min_words_per_letter: int = 4,
        max_words_per_letter: int = 64,
        prompt_template: str = SAEBENCH_TEMPLATE,
        icl_examples: list[str] | tuple[str, ...] = DEFAULT_ICL,
        probe_test_frac: float = 0.2,
        probe_l2: float = 0.1,
        max_k: int = 10,
        f1_jump_threshold: float = 0.03,
        full_absorption_threshold: float = 0.4,
        n_absorbing_latents: int = 3,
        absorber_cos_threshold: float = 0.1,
        full_absorption_cos_threshold: float = 0.025,
        latent_ranking: str = "l1_probe",
        batch_size: int = 32,
        seed: int = 0,
        plot: bool = True,
    ) -> None:
        self.n_samples, self.sample_index = int(n_samples), int(sample_index)
        self.letters = "".join(letters)
        bad = [c for c in self.letters if c not in LETTERS]
        if not self.letters or bad or len(set(self.letters)) != len(self.letters):
            raise ValueError(f"absorption letters must be distinct lowercase a-z, got {letters!r}.")
        if prompt_template.count("{word}") != 1:
            raise ValueError(f"prompt_template must contain {{word}} exactly once, got {prompt_template!r}.")
        if int(min_words_per_letter) < 2:
            raise ValueError("min_words_per_letter must be >= 2 (one probe-train and one test word).")
        if not 0 < float(probe_test_frac) < 1:
            raise ValueError(f"probe_test_frac must be in (0, 1), got {probe_test_frac}.")
        if latent_ranking not in ("l1_probe", "mean_diff"):
            raise ValueError(f"latent_ranking must be 'l1_probe' or 'mean_diff', got {latent_ranking!r}.")
        self.min_word_len, self.min_words_per_letter = int(min_word_len), int(min_words_per_letter)
        self.max_words_per_letter = int(max_words_per_letter)
        self.prompt_template, self.icl_examples = prompt_template, tuple(str(w) for w in icl_examples)
        self.probe_test_frac, self.probe_l2 = float(probe_test_frac), float(probe_l2)
        self.max_k, self.f1_jump_threshold = max(1, int(max_k)), float(f1_jump_threshold)
        self.full_absorption_threshold = float(full_absorption_threshold)
        self.n_absorbing_latents = max(1, int(n_absorbing_latents))
        self.absorber_cos_threshold = float(absorber_cos_threshold)
        self.full_absorption_cos_threshold = float(full_absorption_cos_threshold)
        self.latent_ranking, self.batch_size = latent_ranking, max(1, int(batch_size))
        self.seed, self.plot = int(seed), bool(plot)

    def applies_to(self, source: Any) -> str | None:
        """None for a source with planted `features` or a host with a tokenizer, else why it is skipped."""
        if getattr(source, "features", None) is not None:
            return None
        host = getattr(source, "host", None)
        if host is not None and _has(host, "tokenizer"):
            return None
        return f"the source {type(source).__name__} has neither planted features nor a host with a tokenizer"

    @torch.no_grad()
    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        if getattr(source, "features", None) is not None:
            return self._synthetic(sae, source)
        return self._first_letter(sae, source, Path(out_dir))

    # ------------------------------------------------------------------ synthetic
    def _synthetic(self, sae: SAELike, source: Any) -> EvalResult:
        feats = source.features
        x, coeffs = feats.sample(self.n_samples, self.sample_index)
        s = float(getattr(source, "act_scale", 1.0) or 1.0)  # the SAE was trained on s·x
        codes = sae((x * s).to(sae.W_dec.device)).codes.cpu()
        ab = synthetic_absorption(codes, coeffs, sae.W_dec.cpu(), feats.directions, feats.parent_of)
        return EvalResult(
            metrics={"absorption": ab["absorption"]},
            data={"absorption_per_parent": ab["per_parent"], "parent_match_cos": ab["parent_match_cos"]},
        )

    # ------------------------------------------------------------------ text
    def _memo_key(self, host) -> str:
        identity = getattr(host, "identity", None)
        return json.dumps(
            {
                "host": identity if identity is not None else f"object-{id(host)}",
                "letters": self.letters,
                "min_word_len": self.min_word_len,
                "max_words_per_letter": self.max_words_per_letter,
                "prompt_template": self.prompt_template,
                "icl_examples": self.icl_examples,
                "probe_test_frac": self.probe_test_frac,
                "probe_l2": self.probe_l2,
                "seed": self.seed,
            },
            sort_keys=True,
            default=str,
        )

    def host_part(self, host) -> HostPart:
        """The words, host activations at the word tokens and the letter probes, memoised per process."""
        key = self._memo_key(host)
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
        t0 = time.perf_counter()
        words, labels, is_test = self._word_list(host)
        seqs = prompt_tokens(
            host.tokenizer, words, self.prompt_template, self.icl_examples, getattr(host, "bos_id", None)
        )
        acts = word_activations(host, [seqs[w] for w in words], self.batch_size)
        train = ~is_test
        probe = train_letter_probe(acts[train], labels[train], len(self.letters), self.probe_l2)
        probe_test = probe_metrics(probe, acts[is_test], labels[is_test], len(self.letters))
        part = HostPart(words, labels, is_test, acts, probe, probe_test, time.perf_counter() - t0)
        _MEMO[key] = part
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
        return part

    def _word_list(self, host) -> tuple[list[str], Tensor, Tensor]:
        tok = host.tokenizer
        name = getattr(host, "model_id", type(host).__name__)
        examples = set(self.icl_examples)
        candidates = [
            w for w in vocabulary_words(tok, self.min_word_len) if w[0] in self.letters and w not in examples
        ]

        def keep(batch: list[str]) -> set[str]:
            return set(prompt_tokens(tok, batch, self.prompt_template, self.icl_examples, None))

        by_letter = pick_words(candidates, self.letters, self.max_words_per_letter, self.seed, keep)
        if not any(by_letter.values()):
            raise ValueError(
                f"absorption: the tokenizer of host {name} puts no word in a single token "
                f"({len(candidates)} whole-word vocabulary tokens ' w' of lowercase a-z with len >= "
                f"{self.min_word_len}, none a single token of the prompt {self.prompt_template!r}): the "
                "first-letter task needs a word-level BPE vocabulary (GPT-2, Llama, SmolLM2 style). Use a "
                "host with such a tokenizer, or change eval.metrics.absorption.prompt_template / "
                "icl_examples so the word follows a space."
            )
        short = [
            f"{c} ({len(by_letter[c])})"
            for c in self.letters
            if len(by_letter[c]) < self.min_words_per_letter
        ]
        if short:
            raise ValueError(
                f"absorption: host {name}'s tokenizer gives fewer than min_words_per_letter="
                f"{self.min_words_per_letter} usable words for letter(s) {', '.join(short)}. Lower "
                "eval.metrics.absorption.min_words_per_letter, restrict eval.metrics.absorption.letters "
                f"(e.g. drop those letters), raise max_words_per_letter (now {self.max_words_per_letter}) "
                "or use a host with another tokenizer."
            )
        return split_words(by_letter, self.letters, self.probe_test_frac, self.seed)

    def _first_letter(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        part = self.host_part(source.host)
        s = float(getattr(source, "act_scale", 1.0) or 1.0)
        res = first_letter_absorption(
            part.acts,
            part.labels,
            part.is_test,
            part.probe,
            sae,
            act_scale=s,
            max_k=self.max_k,
            f1_jump_threshold=self.f1_jump_threshold,
            full_absorption_threshold=self.full_absorption_threshold,
            n_absorbing_latents=self.n_absorbing_latents,
            absorber_cos_threshold=self.absorber_cos_threshold,
            full_absorption_cos_threshold=self.full_absorption_cos_threshold,
            latent_ranking=self.latent_ranking,
        )
        test_logits = part.probe.logits(part.acts[part.is_test])  # (n_test, L): argmax = the probe's letter
        counts = torch.bincount(part.labels, minlength=len(self.letters))
        n_test = torch.bincount(part.labels[part.is_test], minlength=len(self.letters))
        per_letter = {}
        for li, letter in enumerate(self.letters):
            per_letter[letter] = {
                "n_words": int(counts[li]),
                "n_test": int(n_test[li]),
                "probe_f1": part.probe_test["f1"][li],
                "probe_accuracy": part.probe_test["accuracy"][li],
                **res.per_letter[li],
            }
        res_metrics = {
            "absorption": res.mean_absorption_fraction,
            "mean_absorption_fraction": res.mean_absorption_fraction,
            "mean_full_absorption": res.mean_full_absorption,
            "mean_num_split_features": res.mean_num_split_features,
        }
        out = EvalResult(
            metrics=res_metrics,
            data={
                "absorption_per_letter": per_letter,
                "absorption_n_words": len(part.words),
                "absorption_probe_mean_f1": sum(part.probe_test["f1"]) / len(self.letters),
                "absorption_probe_top1_accuracy": float(
                    (test_logits.argmax(1) == part.labels[part.is_test]).float().mean()
                ),
                "absorption_host_seconds": round(part.seconds, 3),
            },
        )
        if self.plot:
            from saelab.analysis import plots

            nan = float("nan")
            series = {
                "absorption fraction": [
                    nan if e["mean_absorption_fraction"] is None else e["mean_absorption_fraction"]
                    for e in res.per_letter
                ],
                "full absorption": [
                    nan if e["full_absorption_rate"] is None else e["full_absorption_rate"]
                    for e in res.per_letter
                ],
            }
            out.figures["first-letter absorption"] = plots.bars(
                list(self.letters), series, out_dir / "absorption.png", "mean over probe true positives",
                "First-letter absorption", xlabel="first letter of the token",
            )  # fmt: skip
        return out
