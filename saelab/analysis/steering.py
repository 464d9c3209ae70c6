"""α-sweep steering evaluation for text: how often a steered continuation expresses the latent's concept, and
what fluency that costs.

For latent j and strength α, every forward of the decoding loop runs with h ← h + α·W_dec[j]/s at the
hook, on every position (`saelab.edit.LatentEdit` in "add" mode; Turner et al., arXiv:2308.10248, with SAE
latents as in Templeton et al. 2024, "Scaling Monosemanticity"). α = 0 is the unsteered model and is always
part of the sweep. Over prompts P and n samples each, with continuations c_{p,s}(j, α):

    concept_rate(j, α) = mean_{p,s} judge(c_{p,s}(j, α))                 judge: text → bool
    perplexity(j, α)   = mean_{p,s} exp( −1/|c| Σ_{t∈c} log p_clean(c_t | p, c_<t) )

The default judge is a keyword match: any of the latent's keywords, case-insensitive, on word boundaries,
in the generated part only (the prompt never counts). Keywords are given per latent or suggested from the
latent's logit lens (`suggest_keywords`: its top promoted tokens, stripped of whitespace and punctuation,
≥ 3 characters, common function words left out). A callable judge (an LM scorer, as AxBench's concept
score, Wu et al. arXiv:2501.17148) plugs in the same way. The fluency cost is the perplexity of the continuation under the clean (unedited)
model given its prompt: the steered text is re-tokenised after the prompt's tokens (BOS + prompt, as
`CausalLMHost.prompt_ids` builds them) and only continuation tokens are averaged; a continuation with no
tokens (EOS at once) has no perplexity (NaN, left out of the mean).

Decoding is greedy, or sampled with sample s seeded by `seed + s`; every (latent, α) cell uses the same
seeds (common random numbers), so α = 0 is exactly `host.generate` without an edit and differences between
cells come from the edit, not the draw.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from saelab.analysis.lens import logit_lens
from saelab.edit import LatentEdit
from saelab.hosts.causal_lm import CausalLMHost
from saelab.types import SAELike

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Judge = Callable[[str], bool]
# keywords for every latent, or per latent
Concept = Sequence[str] | Mapping[int, Sequence[str]]


# ---------------------------------------------------------------------- concept judges
def keyword_pattern(keywords: Sequence[str]) -> re.Pattern[str]:
    """A case-insensitive regex matching any keyword as a whole word (not inside a longer word).

    "Word boundary" is (?<!\\w) before and (?!\\w) after, so keywords that start or end with punctuation
    ("c++", "U.S.") match too; whitespace inside a keyword matches any run of whitespace.
    """
    words = [k.strip() for k in keywords if k and k.strip()]
    if not words:
        raise ValueError("a keyword judge needs at least one non-empty keyword.")
    alts = "|".join(
        r"\s+".join(re.escape(p) for p in w.split()) for w in sorted(words, key=len, reverse=True)
    )
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


def mentions(text: str, keywords: Sequence[str]) -> bool:
    """Whether `text` contains any of `keywords` as a whole word, ignoring case (`keyword_pattern`)."""
    return keyword_pattern(keywords).search(text) is not None


def keyword_judge(keywords: Sequence[str]) -> Judge:
    """The judge text → bool of `mentions(text, keywords)`, with the pattern compiled once."""
    pattern = keyword_pattern(keywords)
    return lambda text: pattern.search(text) is not None


_EDGES = re.compile(r"^[\W_]+|[\W_]+$")  # whitespace, punctuation and symbols at either end
# English function words of ≥ 3 letters: promoted by many latents' lenses, and in nearly every text, so as
# concept keywords they would count almost every continuation as on-concept
STOPWORDS = frozenset(
    "the and for are but not you all any can her was one our out his has had him how its may who did get "
    "she too use that with have this will your from they been were said each which their there what about "
    "would these other into more some than then them only also very when where while just over such".split()
)


def suggest_keywords(
    sae: SAELike,
    host: CausalLMHost,
    latent: int,
    k: int = 20,
    scale: float | None = None,
    min_chars: int = 3,
    stopwords: frozenset[str] = STOPWORDS,
) -> list[str]:
    """Keywords for `latent` from its logit lens: its top-`k` promoted tokens (`logit_lens`) as
    `keywords_from_tokens` cleans them, highest logit first. May be empty."""
    lens = logit_lens(sae, host, [int(latent)], k=k, scale=_scale(sae, scale))
    return keywords_from_tokens(lens.promoted_tokens[0], min_chars, stopwords)


def keywords_from_tokens(
    tokens: Sequence[str], min_chars: int = 3, stopwords: frozenset[str] = STOPWORDS
) -> list[str]:
    """Token strings as keywords: whitespace, punctuation and symbols stripped from both ends; those shorter
    than `min_chars` or in `stopwords` (any case) dropped; the first of case-insensitive duplicates kept
    (" Wedding", "wedding" → "Wedding"); order kept."""
    out: list[str] = []
    seen = set(stopwords)
    for token in tokens:
        word = _EDGES.sub("", token)
        if len(word) >= min_chars and word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return out


# ---------------------------------------------------------------------- fluency
@torch.no_grad()
def continuation_nll(
    host: CausalLMHost, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 16
) -> tuple[Float[Tensor, " n"], Int[Tensor, " n"]]:
    """(mean NLL per continuation token, number of continuation tokens) of each continuation after its prompt,
    under the clean model: rows [BOS, prompt tokens, continuation tokens], right-padded (so no real token
    moves), scored by `host.token_losses`; NaN where a continuation has no tokens."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
    tok = host.tokenizer
    bos = [] if host.bos_id is None else [int(host.bos_id)]
    rows, starts = [], []
    for p, c in zip(prompts, continuations, strict=True):
        head = bos + list(tok(p, add_special_tokens=False)["input_ids"])
        tail = list(tok(c, add_special_tokens=False)["input_ids"]) if c else []
        rows.append(head + tail)
        starts.append(len(head))
    nll = torch.full((len(rows),), math.nan, dtype=torch.float64)
    n_tok = torch.tensor([len(r) - s for r, s in zip(rows, starts, strict=True)], dtype=torch.long)
    for a in range(0, len(rows), batch_size):
        batch = [i for i in range(a, min(a + batch_size, len(rows))) if n_tok[i] > 0]
        if not batch:
            continue
        width = max(len(rows[i]) for i in batch)
        ids = torch.full((len(batch), width), host.pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        keep = torch.zeros((len(batch), width - 1))  # loss[b, t] scores token t + 1
        for b, i in enumerate(batch):
            ids[b, : len(rows[i])] = torch.tensor(rows[i])
            att[b, : len(rows[i])] = 1
            keep[b, starts[i] - 1 : len(rows[i]) - 1] = 1
        losses = host.token_losses(ids, att).cpu().double()  # (B, width - 1)
        nll[batch] = (losses * keep).sum(1) / keep.sum(1)
    return nll, n_tok


def continuation_perplexity(
    host: CausalLMHost, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 16
) -> Float[Tensor, " n"]:
    """exp(mean NLL of the continuation tokens) of each continuation after its prompt (`continuation_nll`)."""
    return continuation_nll(host, prompts, continuations, batch_size)[0].exp()


# ---------------------------------------------------------------------- the sweep
@dataclass(frozen=True)
class SteeringResult:
    """One α sweep: per (latent, α) cell the concept rate, the mean clean-model perplexity and the count.

    Tensors are [latent, alpha] in the order of `latents` and `alphas` (ascending, 0 included). `texts`,
    `hits` and `perplexities` hold each cell's generations, sample-major: entry i continues
    `prompts[i % len(prompts)]` with sample i // len(prompts). `concepts`: the keywords used per latent, or
    the judge's name.
    """

    latents: list[int]
    alphas: list[float]
    prompts: list[str]
    n_samples: int
    concepts: dict[int, list[str] | str]
    concept_rate: Float[Tensor, "latent alpha"]
    perplexity: Float[Tensor, "latent alpha"]
    n: Int[Tensor, "latent alpha"]
    texts: dict[tuple[int, float], list[str]]
    hits: dict[tuple[int, float], list[bool]]
    perplexities: dict[tuple[int, float], list[float]]

    def rows(self) -> list[dict[str, Any]]:
        """The table as plain data: one {latent, alpha, concept_rate, perplexity, n} per cell."""
        return [
            {
                "latent": j,
                "alpha": a,
                "concept_rate": float(self.concept_rate[r, c]),
                "perplexity": float(self.perplexity[r, c]),
                "n": int(self.n[r, c]),
            }
            for r, j in enumerate(self.latents)
            for c, a in enumerate(self.alphas)
        ]

    def table(self) -> tuple[list[str], list[list]]:
        """(headers, rows): latent × α → concept rate, mean perplexity, n."""
        headers = ["latent", "alpha", "concept_rate", "perplexity", "n"]
        return headers, [[d[h] for h in headers] for d in self.rows()]

    def examples(self, latent: int, alpha: float, n: int = 3) -> list[str]:
        """The first `n` continuations of one cell."""
        return self.texts[(int(latent), float(alpha))][:n]

    def __str__(self) -> str:
        lines = [f"{'latent':>7} {'alpha':>9} {'concept':>8} {'ppl':>9} {'n':>4}"]
        for d in self.rows():
            lines.append(
                f"{d['latent']:>7} {d['alpha']:>9.3g} {d['concept_rate']:>8.2f} {d['perplexity']:>9.2f} {d['n']:>4}"
            )
        return "\n".join(lines)

    def figure(self) -> Figure:
        return steering_figure(self)

    def plot(self, path: str | Path) -> Path:
        return steering_plot(self, path)


def _scale(sae: SAELike, scale: float | None) -> float:
    """The SAE's activation scale s: given, else what `load_sae` recorded (`act_scale`), else 1."""
    return float(scale if scale is not None else (getattr(sae, "act_scale", None) or 1.0))


def _judges(
    sae: SAELike,
    host: CausalLMHost,
    latents: list[int],
    concept: Concept | None,
    judge: str | Judge | Mapping[int, Judge],
    scale: float,
) -> tuple[dict[int, Judge], dict[int, list[str] | str]]:
    """Per latent, the judge and what it was built from (its keywords, or the judge's name)."""
    if callable(judge):
        name = getattr(judge, "__name__", type(judge).__name__)
        return {j: judge for j in latents}, {j: name for j in latents}
    if isinstance(judge, Mapping):
        missing = [j for j in latents if j not in judge]
        if missing:
            raise ValueError(f"judge has no entry for latents {missing}.")
        return {j: judge[j] for j in latents}, {
            j: getattr(judge[j], "__name__", type(judge[j]).__name__) for j in latents
        }
    if judge != "keyword":
        raise ValueError(
            f'judge must be "keyword", a callable text → bool or {{latent: callable}}; got {judge!r}.'
        )
    words: dict[int, list[str]] = {}
    for j in latents:
        if concept is None:
            words[j] = suggest_keywords(sae, host, j, scale=scale)
        elif isinstance(concept, Mapping):
            if j not in concept:
                raise ValueError(f"concept has no keywords for latent {j} (it has {sorted(concept)}).")
            words[j] = _listed(concept[j])
        else:
            words[j] = _listed(concept)
        if not words[j]:
            raise ValueError(
                f"latent {j} has no keywords (its logit lens suggested none of ≥ 3 characters): "
                "pass concept={latent: [words]} or a judge callable."
            )
    return {j: keyword_judge(w) for j, w in words.items()}, dict(words)


def _listed(words: str | Sequence[str]) -> list[str]:
    """A keyword list; a lone string is one keyword, not a list of characters."""
    return [words] if isinstance(words, str) else [str(w) for w in words]


@torch.no_grad()
def steering_sweep(
    host: CausalLMHost,
    sae: SAELike,
    latents: Sequence[int],
    alphas: Sequence[float],
    prompts: Sequence[str],
    concept: Concept | None = None,
    max_new_tokens: int = 16,
    n_samples: int = 1,
    seed: int = 0,
    judge: str | Judge | Mapping[int, Judge] = "keyword",
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    scale: float | None = None,
    batch_size: int = 16,
) -> SteeringResult:
    """Steer each latent at each α (0 added when absent), generate, judge and score (module docstring).

    Args:
        host: the causal LM host the SAE was trained on.
        sae: the SAE (`W_dec` rows are the steering directions).
        latents: the latents to steer, one at a time.
        alphas: steering strengths in SAE units (α·W_dec[j] is what a code of α on latent j decodes to).
        prompts: the prompts continued in every cell.
        concept: keywords for every latent (a list) or per latent ({latent: [words]}); None: suggested from
            each latent's logit lens (`suggest_keywords`). Unused with a callable judge.
        max_new_tokens: tokens generated per continuation.
        n_samples: continuations per prompt (sampling only; greedy decoding gives one).
        seed: sample s is drawn with seed `seed + s`, the same in every cell.
        judge: "keyword", a callable text → bool (e.g. an LM scorer), or {latent: callable}.
        greedy: greedy decoding instead of sampling from softmax(logits / temperature).
        scale: the SAE's activation scale s (default: `sae.act_scale` as `load_sae` sets it, else 1).
        batch_size: rows per clean-model forward when scoring perplexity.
    """
    latents = [int(j) for j in latents]
    prompts = list(prompts)
    if not latents or not prompts:
        raise ValueError("steering_sweep needs at least one latent and one prompt.")
    if n_samples < 1 or (greedy and n_samples != 1):
        raise ValueError(
            f"n_samples={n_samples}: greedy decoding gives one continuation per prompt (n_samples=1); "
            "sample (greedy=False) for more."
        )
    grid = sorted({0.0, *(float(a) for a in alphas)})
    s = _scale(sae, scale)
    judges, concepts = _judges(sae, host, latents, concept, judge, s)
    contexts = [p for _ in range(n_samples) for p in prompts]  # sample-major, as the texts are stored

    def generate(edit: LatentEdit | None) -> list[str]:
        out: list[str] = []
        for i in range(n_samples):
            out += host.generate(
                prompts, max_new_tokens, edit=edit, greedy=greedy, temperature=temperature, seed=seed + i
            )
        return out

    def ppl(texts: list[str]) -> list[float]:
        return continuation_perplexity(host, contexts, texts, batch_size).tolist()

    base = generate(None)  # α = 0: the unsteered model, shared by every latent
    base_ppl = ppl(base)
    texts, hits, perps = {}, {}, {}
    shape = (len(latents), len(grid))
    rate, mean_ppl, n = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape, dtype=torch.long)
    for r, j in enumerate(latents):
        for c, a in enumerate(grid):
            if a == 0.0:
                cell, cell_ppl = base, base_ppl
            else:
                cell = generate(LatentEdit(sae, [j], "add", a, scale=s))
                cell_ppl = ppl(cell)
            texts[(j, a)], perps[(j, a)] = cell, cell_ppl
            hits[(j, a)] = [bool(judges[j](t)) for t in cell]
            rate[r, c] = sum(hits[(j, a)]) / len(cell)
            finite = [p for p in cell_ppl if math.isfinite(p)]
            mean_ppl[r, c] = sum(finite) / len(finite) if finite else math.nan
            n[r, c] = len(cell)
    return SteeringResult(
        latents=latents,
        alphas=grid,
        prompts=prompts,
        n_samples=int(n_samples),
        concepts=concepts,
        concept_rate=rate,
        perplexity=mean_ppl,
        n=n,
        texts=texts,
        hits=hits,
        perplexities=perps,
    )


# ---------------------------------------------------------------------- plot
def steering_figure(result: SteeringResult) -> Figure:
    """Concept rate (left) and mean clean-model perplexity (right, log scale) against α, one line per latent;
    the dashed line on the right is the unsteered perplexity. α spanning decades gets a symlog axis."""
    from matplotlib.figure import Figure

    from saelab.analysis.plots import REFERENCE

    fig = Figure(figsize=(9, 3.4))
    ax_rate, ax_ppl = fig.subplots(1, 2)
    xs = result.alphas
    nonzero = [abs(a) for a in xs if a != 0]
    symlog = bool(nonzero) and max(nonzero) / min(nonzero) > 20
    for r, j in enumerate(result.latents):
        ax_rate.plot(xs, result.concept_rate[r].tolist(), "o-", label=f"latent {j}")
        ax_ppl.plot(xs, result.perplexity[r].tolist(), "o-", label=f"latent {j}")
    c0 = xs.index(0.0)
    base = float(result.perplexity[0, c0])
    if math.isfinite(base) and base > 0:
        ax_ppl.axhline(base, label="unsteered", **REFERENCE)
        ax_ppl.set_yscale("log")
    for ax in (ax_rate, ax_ppl):
        if symlog:
            ax.set_xscale("symlog", linthresh=min(nonzero))
        ax.set_xlabel("α (SAE units)")
        ax.legend(fontsize=8)
    ax_rate.set_ylim(-0.03, 1.03)
    ax_rate.set_ylabel("concept rate")
    ax_rate.set_title("Share of continuations with the concept")
    ax_ppl.set_ylabel("perplexity (clean model)")
    ax_ppl.set_title("Fluency cost")
    return fig


def steering_plot(result: SteeringResult, path: str | Path) -> Path:
    """`steering_figure` written as a PNG at `path`."""
    from saelab.analysis import plots

    return plots.save(steering_figure(result), Path(path))
