"""`autointerp`: explain latents with a chat LM and score the explanations (Paulo et al. 2024,
"Automatically Interpreting Millions of Features in LLMs", arXiv:2410.13928; EleutherAI delphi; SAEBench's
autointerp).

For each of `n_latents` latents (seeded among those with enough contexts, or the `latents` given):

1. contexts come from `FeatureRecords` (`saelab.analysis.features`): reused from the run dir's `features/`
   when they belong to this SAE and source, else collected over `tokens` rows of the split;
2. the explainer LM reads the `explain_top` top contexts and `explain_samples` quantile samples, firing
   tokens marked <<like this>>, and writes a one-line explanation (`saelab.interp.explain`);
3. scorers (`saelab.interp.score`) test it on `n_score` held-out quantile samples and as many random
   non-activating windows: `detection` and `fuzzing` (the scorer LM says whether the latent fires in a
   context / whether the marked tokens are the right ones; 0.5 = chance) and `embedding` (AUROC of MiniLM
   cosine similarity, no generation; 0.5 = chance).

Scoring (`scoring`): with `logprob` (the default when the scorer has `yes_probability`, i.e. a local
`HFChatLM`; delphi's log-probability scorers) each context is its own chat asking for Yes / No, and the
answer is P(Yes) / (P(Yes) + P(No)) of the next token after the opened assistant turn, from one batched,
left-padded forward pass with no generation. The score per latent is the balanced accuracy of P(Yes) > ½
and the AUROC of P(Yes). With `generate` (any ChatLM, e.g. an OpenAI-compatible server) `examples_per_prompt`
numbered contexts go in one chat, the LM generates a list of 0/1 answers, and the score is the balanced
accuracy of the answers it could parse.

Metrics: `autointerp_detection`, `autointerp_fuzzing` (balanced accuracy), `autointerp_detection_auroc`,
`autointerp_fuzzing_auroc` (logprob only), `autointerp_embedding` (means over the scored latents, NaN ones
left out), `autointerp_<scorer>_unparsed` (share of contexts whose answer could not be read; 0 with
logprob), `autointerp_n_latents`. The per-latent table goes to `tables["autointerp"]` and
`data["autointerp"]`, and to `<out_dir>/autointerp/explanations.jsonl` (written atomically). Answers and
P(Yes) values are cached in `<out_dir>/autointerp/cache.jsonl`, so a killed run resumes and a rerun sends
no prompt twice.

What the embedded SmolLM2-135M-Instruct gives as explainer and scorer, measured once. Setup: a TopK SAE
(d_sae 1024, k 16; 1,500 Adam steps of 256 rows on 32,768 layer-6 activations of the offline `general`
corpus, FVU ≈ 0.1); latents drawn with seed 0; contexts from 8,192 validation tokens; greedy decoding;
defaults otherwise (n_score 10). It cannot do the task:

- explanations: nearly all copy or list a context ("1. The 2016 Beijing Olympics", "12.12.2012,
  12.12.2012, ..."). One is a generic phrase ("the way a person's body reacts to a particular stimulus.").
- generate scoring (8 latents, 5 contexts per prompt): 100 % of detection and fuzzing answers are
  unparseable ("[1, 2, 3, 4, 5, 6, ...", "[1, 0, 1]" for 5 snippets), so both scores are NaN. With one
  context per prompt, 94 % / 97 % are unparseable.
- logprob scoring (16 latents; 20 detection and 9–10 fuzzing contexts each, 477 chats): every answer is
  read, but P(Yes) lies in 0.04–0.34 (median 0.14), so every prediction is "No" and both balanced
  accuracies are exactly 0.5. The AUROCs are near chance: detection 0.545 ± 0.03 (mean ± s.e. over 16
  latents; range 0.27–0.74, 13 of 16 above 0.5), fuzzing 0.51 ± 0.06 (range 0.20–0.88). Embedding AUROC is
  0.49 ± 0.03 (range 0.22–0.68).

So with SmolLM2 the evaluator is a plumbing check. For real scores, point `explainer` at an
OpenAI-compatible server with a large instruct model (the paper used Llama-3.1-70B). For the scorer, use
the same server, or a local HF model large enough to follow the question, with logprob scoring. The
embedding score needs no LM for scoring but inherits the explainer's quality.

Cost on 2 CPU cores shared with other jobs (load 3–7): ≈ 86 s per explainer prompt, with 8 of the 16
explanations reused from the cache. Logprob scoring took 1.9 s per chat (≈ 200 tokens, batches of 8), so
≈ 56 s per latent for 30 chats. An earlier, less loaded run spent 12 s per 5-context generated prompt.
Command: `/tmp/measure/run_logprob.py` (the `AutoInterp` call with n_latents=16, tokens=8192, seed=0 on
the SAE above). It took 27 min of wall time, because the test suite was running at the same moment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.analysis.features import FeatureRecords, _rows, collect_feature_records
from saelab.eval.base import EvalResult, Table
from saelab.files import atomic_write_text
from saelab.interp.clients import (
    CachedChatLM,
    ChatLM,
    ChatServerError,
    HFChatLM,
    make_client,
    supports_logprob,
)
from saelab.interp.contexts import non_activating_contexts, to_example
from saelab.interp.explain import explainer_prompt, parse_explanation
from saelab.interp.prompts import Chat
from saelab.interp.score import (
    SCORERS,
    classifier_prompts,
    detection_items,
    embedding_score,
    fuzzing_items,
    score_answers,
    score_probabilities,
    yes_no_prompts,
)
from saelab.types import SAELike


def _nanmean(values: Sequence[float]) -> float:
    """The mean of the finite values; NaN when there is none."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _has(obj: Any, name: str) -> bool:
    """Whether obj has attribute `name`, without evaluating a property (a host's loads its model)."""
    return name in getattr(obj, "__dict__", {}) or hasattr(type(obj), name)


class AutoInterp:
    """`autointerp`: LM explanations of latents, scored by detection, fuzzing and embedding similarity.

    See the module docstring for the protocol and the metrics.

    Args:
        n_latents: latents explained, drawn (seeded) among those with enough contexts.
        latents: explicit latent ids instead of a draw (those without enough contexts are skipped).
        scorers: any of "detection", "fuzzing", "embedding".
        explainer: the explainer chat client (a ChatLM, built by Hydra from its `_target_` node, or a
            `_target_` mapping); None = `HFChatLM()`, the embedded SmolLM2 on the activation host's device.
        scorer: the detection / fuzzing client; None = the explainer's object (one model loaded).
        scoring: "logprob" (one context per chat, P(Yes) read from the next-token logits, no generation;
            needs a scorer with `yes_probability`, i.e. `HFChatLM`), "generate" (numbered contexts, a
            generated list of 0/1 parsed), or None = logprob when the scorer can, else generate.
        embedder: a sentence-transformers folder for the embedding scorer (None = the offline MiniLM), or
            an object with `encode(texts) -> [n, dim]`.
        split: the source split the contexts come from.
        tokens: rows streamed when the feature records are collected here (None = the whole split).
        window: (left, right) tokens around each selected position.
        top_k, n_quantiles, per_quantile, reservoir: `collect_feature_records` settings (collection only).
        records: a run dir or `features/` folder to take records from (default: `out_dir` and its parent).
        explain_top: top contexts shown to the explainer.
        explain_samples: quantile samples added to them (not used for scoring).
        n_score: activating contexts per scorer, with as many non-activating ones.
        min_examples: fewer activating or non-activating contexts than this skips the latent.
        examples_per_prompt: contexts per detection / fuzzing prompt.
        mark_frac: a token is marked when its activation is > 0 and > mark_frac · the window's largest.
        explain_max_tokens, score_max_tokens: generation budgets.
        temperature: 0 = greedy.
        batch_size: prompts per client call (and per cache flush).
        cache: keep answers in `<out_dir>/autointerp/cache.jsonl` (or `cache_file`).
        prompts: another prompts YAML file (default `saelab/interp/prompts.yaml`).
        seed: the latent draw, context picks and shuffles.
    """

    name = "autointerp"
    needs: tuple[str, ...] = ()  # a text source whose host generates: see applies_to

    def __init__(
        self,
        n_latents: int = 16,
        latents: Sequence[int] | None = None,
        scorers: Sequence[str] = SCORERS,
        explainer: ChatLM | Mapping[str, Any] | None = None,
        scorer: ChatLM | Mapping[str, Any] | None = None,
        scoring: Literal["logprob", "generate"] | None = None,
        embedder: Any = None,
        split: str = "val",
        tokens: int | None = 16384,
        window: Sequence[int] = (16, 4),
        top_k: int = 10,
        n_quantiles: int = 5,
        per_quantile: int = 4,
        reservoir: int = 256,
        records: str | None = None,
        explain_top: int = 8,
        explain_samples: int = 4,
        n_score: int = 10,
        min_examples: int = 4,
        examples_per_prompt: int = 5,
        mark_frac: float = 0.0,
        explain_max_tokens: int = 48,
        score_max_tokens: int = 32,
        temperature: float = 0.0,
        batch_size: int = 8,
        cache: bool = True,
        cache_file: str | None = None,
        prompts: str | None = None,
        seed: int = 0,
    ) -> None:
        unknown = set(scorers) - set(SCORERS)
        if unknown:
            raise ValueError(f"unknown autointerp scorers {sorted(unknown)}: choose among {list(SCORERS)}.")
        if len(window) != 2 or min(int(w) for w in window) < 0:
            raise ValueError(f"window=(left, right) must be two non-negative ints, got {list(window)}.")
        self.n_latents, self.latents = int(n_latents), None if latents is None else [int(j) for j in latents]
        self.scorers = [s for s in SCORERS if s in set(scorers)]
        self.explainer = make_client(explainer) if explainer is not None else HFChatLM()
        self.scorer = make_client(scorer) if scorer is not None else self.explainer
        if scoring not in (None, "logprob", "generate"):
            raise ValueError(f"autointerp scoring must be logprob, generate or null, got {scoring!r}.")
        if scoring == "logprob" and not supports_logprob(self.scorer):
            raise ValueError(
                f"scoring=logprob needs a scorer with yes_probability (HFChatLM), not "
                f"{type(self.scorer).__name__}: use scoring=generate."
            )
        self.scoring: str = scoring or ("logprob" if supports_logprob(self.scorer) else "generate")
        self.embedder = embedder
        self.split, self.tokens = split, None if tokens is None else int(tokens)
        self.window = (int(window[0]), int(window[1]))
        self.top_k, self.n_quantiles, self.per_quantile, self.reservoir = (
            int(top_k),
            int(n_quantiles),
            int(per_quantile),
            int(reservoir),
        )
        self.records = records
        self.explain_top, self.explain_samples = int(explain_top), int(explain_samples)
        self.n_score, self.min_examples = int(n_score), max(1, int(min_examples))
        self.examples_per_prompt, self.mark_frac = max(1, int(examples_per_prompt)), float(mark_frac)
        self.explain_max_tokens, self.score_max_tokens = int(explain_max_tokens), int(score_max_tokens)
        self.temperature, self.batch_size = float(temperature), max(1, int(batch_size))
        self.cache, self.cache_file, self.prompts, self.seed = bool(cache), cache_file, prompts, int(seed)

    def applies_to(self, source: Any) -> str | None:
        """None for a text source (harvested splits with document positions) whose host is a causal LM."""
        host = getattr(source, "host", None)
        if host is None or not callable(getattr(source, "store", None)):
            return f"needs a text source with a causal-LM host, got {type(source).__name__}"
        if not (_has(host, "generate") and _has(host, "tokenizer")):
            return f"the host {type(host).__name__} is not a causal LM (no generate / tokenizer)"
        return None

    # ------------------------------------------------------------------ feature records
    def _record_dirs(self, out_dir: Path) -> list[Path]:
        return [Path(self.records)] if self.records else [out_dir, out_dir.parent]

    def _mismatch(self, rec: FeatureRecords, sae: SAELike, source: Any) -> str | None:
        """Why saved records are not this SAE's on this source's split (None when they are)."""
        d_sae = int(sae.W_dec.shape[0])
        if rec.d_sae != d_sae:
            return f"they have {rec.d_sae} latents, the SAE {d_sae}"
        if rec.meta.get("split", self.split) != self.split:
            return f"they are of split {rec.meta.get('split')!r}, not {self.split!r}"
        key = getattr(source, "key", None)
        if callable(key) and "source" in rec.meta:
            if json.dumps(rec.meta["source"], sort_keys=True) != json.dumps(
                key(self.split), sort_keys=True, default=str
            ):
                return "they were collected on another source"
        # the records name no SAE: re-encode a few top rows and compare their activations
        lat, slot = torch.nonzero(rec.top_row >= 0, as_tuple=True)
        pick = torch.randperm(lat.numel(), generator=torch.Generator().manual_seed(self.seed))[:32]
        if pick.numel() == 0:
            return None
        lat, slot = lat[pick], slot[pick]
        rows = rec.top_row[lat, slot]
        s = float(rec.meta.get("act_scale", getattr(source, "act_scale", 1.0)) or 1.0)
        x = _rows(source, self.split).acts(rows)
        with torch.no_grad():
            f = sae((x * s).to(sae.W_dec.device, sae.W_dec.dtype)).codes.float().cpu() / s  # (n, d_sae)
        got, want = f[torch.arange(lat.numel()), lat], rec.top_act[lat, slot]
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
            return "their activations are not this SAE's"
        return None

    def feature_records(self, sae: SAELike, source: Any, out_dir: Path) -> FeatureRecords:
        """The run's saved records when they are this SAE's on this split, else freshly collected ones."""
        for folder in self._record_dirs(Path(out_dir)):
            if not ((folder / "meta.json").is_file() or (folder / "features" / "meta.json").is_file()):
                continue
            rec = FeatureRecords.load(folder)
            why = self._mismatch(rec, sae, source)
            if why is None:
                return rec
            print(f"saelab: autointerp: not reusing the feature records in {folder}: {why}.")
        return collect_feature_records(
            sae,
            source,
            split=self.split,
            n_tokens=self.tokens,
            top_k=self.top_k,
            n_quantiles=self.n_quantiles,
            per_quantile=self.per_quantile,
            reservoir=max(self.reservoir, self.n_quantiles),
            window=self.window,
            seed=self.seed,
        )

    # ------------------------------------------------------------------ choosing latents and contexts
    def choose_latents(self, rec: FeatureRecords) -> list[int]:
        """The explicit `latents`, or every latent with enough samples in a seeded random order (the
        first `n_latents` of them that also get enough non-activating contexts are explained)."""
        if self.latents is not None:
            bad = [j for j in self.latents if not 0 <= j < rec.d_sae]
            if bad:
                raise ValueError(
                    f"autointerp latents {bad} are out of range: the SAE has {rec.d_sae} latents."
                )
            return list(dict.fromkeys(self.latents))
        n_samples = (rec.sample_row >= 0).sum(1)  # (d_sae,)
        ok = (rec.top_row[:, 0] >= 0) & (n_samples >= self.explain_samples + self.min_examples)
        eligible = torch.nonzero(ok).squeeze(1).tolist()
        return random.Random(self.seed).sample(eligible, len(eligible))

    def split_contexts(self, rec: FeatureRecords, j: int) -> tuple[list, list]:
        """(explainer contexts, held-out activating contexts) of latent j: top contexts plus some quantile
        samples for the explainer; up to `n_score` other samples, at other positions, for the scorers."""
        r = rec.latent(j)
        rng = random.Random(f"{self.seed}-split-{j}")
        idx = list(range(len(r.samples)))
        shown = set(rng.sample(idx, min(self.explain_samples, len(idx))))
        explain = r.top[: self.explain_top] + [r.samples[i] for i in sorted(shown)]
        used = {(c.doc, c.pos) for c in explain}
        pool = [c for i, c in enumerate(r.samples) if i not in shown and (c.doc, c.pos) not in used]
        held = rng.sample(pool, min(self.n_score, len(pool)))
        return explain, sorted(held, key=lambda c: c.act)

    def plan(
        self, sae: SAELike, source: Any, rec: FeatureRecords, decode: Callable[[int], str]
    ) -> tuple[list[dict[str, Any]], dict[int, str]]:
        """Per latent to explain: its explainer, held-out activating and non-activating examples.

        Candidates (`choose_latents`) are taken in order, as many at a time as are still missing, until
        `n_latents` have at least `min_examples` of both kinds (every explicit latent is tried once); the
        activating and non-activating sets are cut to the same size. Returns (plans, {skipped latent: why}).
        """
        order = self.choose_latents(rec)
        want = len(order) if self.latents is not None else min(self.n_latents, len(order))
        plans: list[dict[str, Any]] = []
        skipped: dict[int, str] = {}
        at = 0
        while len(plans) < want and at < len(order):
            batch = order[at : at + want - len(plans)]
            negatives = non_activating_contexts(
                sae, source, batch, self.n_score, rec.n_tokens, rec.window, self.split, self.seed + at
            )
            at += len(batch)
            for j in batch:
                explain, held = self.split_contexts(rec, j)
                k = min(len(held), len(negatives[j]))
                if not explain or k < self.min_examples:
                    skipped[j] = (
                        f"{len(held)} held-out activating and {len(negatives[j])} non-activating contexts "
                        f"(min_examples={self.min_examples})"
                    )
                    continue
                rng = random.Random(f"{self.seed}-balance-{j}")
                pos = sorted(rng.sample(held, k), key=lambda c: c.act)
                plans.append(
                    {
                        "latent": j,
                        "explain": [to_example(c, decode) for c in explain],
                        "pos": [to_example(c, decode) for c in pos],
                        "neg": [to_example(c, decode) for c in negatives[j][:k]],
                    }
                )
        return sorted(plans, key=lambda p: p["latent"]), skipped

    # ------------------------------------------------------------------ running prompts
    def _client(self, client: ChatLM, path: Path, host: Any) -> ChatLM:
        if isinstance(client, HFChatLM) and client.device is None:
            # a local model runs where the host runs, unless told otherwise (same weights are shared)
            client.device = getattr(host, "device", None) or "cpu"
        return CachedChatLM(client, path, chunk=self.batch_size) if self.cache else client

    @contextlib.contextmanager
    def _answers_kept(self, cache_path: Path, done: Callable[[], int], total: int) -> Iterator[None]:
        """Re-raise a chat endpoint's failure saying how far the run got and what a rerun does."""
        try:
            yield
        except ChatServerError as e:
            kept = (
                f"the answers received so far are kept in {cache_path}: rerun the same command to send "
                "only the missing prompts"
                if self.cache
                else "nothing is kept (cache=false): set eval.metrics.autointerp.cache=true to resume"
            )
            raise ChatServerError(
                f"autointerp stopped after {done()} of {total} prompts: {e}; {kept}."
            ) from e

    def _batched(
        self, call: Callable[[list[Chat]], list], client: Any, prompts: list[Chat], desc: str
    ) -> list:
        """`call` on `prompts` in batches of `batch_size` under a progress bar; a failed endpoint says how
        far it got (`_answers_kept`)."""
        out: list = []
        path = getattr(client, "path", None) or Path("cache.jsonl")
        with (
            self._answers_kept(path, lambda: len(out), len(prompts)),
            tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar,
        ):
            for i in range(0, len(prompts), self.batch_size):
                part = prompts[i : i + self.batch_size]
                out += call(part)
                bar.update(len(part))
        return out

    def _complete(self, client: ChatLM, prompts: list[Chat], max_tokens: int, desc: str) -> list[str]:
        return self._batched(
            lambda part: client.complete(part, max_tokens=max_tokens, temperature=self.temperature),
            client,
            prompts,
            desc,
        )

    def _yes_probability(self, client: Any, prompts: list[Chat], desc: str) -> list[float]:
        return self._batched(client.yes_probability, client, prompts, desc)

    # ------------------------------------------------------------------ the evaluation
    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        out_dir = Path(out_dir)
        folder = out_dir / "autointerp"
        cache_path = Path(self.cache_file) if self.cache_file else folder / "cache.jsonl"
        rec = self.feature_records(sae, source, out_dir)
        tok = source.host.tokenizer
        decode = functools.cache(lambda t: tok.decode([int(t)]))

        plans, skipped = self.plan(sae, source, rec, decode)
        if skipped:
            print(
                f"saelab: autointerp: skipped {len(skipped)} latents without enough contexts: {sorted(skipped)}"
            )
        if not plans:
            print(
                "saelab: autointerp: no latent has enough contexts; raise `tokens` or lower `min_examples`."
            )
            return self._result([], rec, skipped, folder, self.explainer, None)

        # 1. explanations
        explainer = self._client(self.explainer, cache_path, source.host)
        raw = self._complete(
            explainer,
            [explainer_prompt(p["explain"], self.mark_frac, self.prompts) for p in plans],
            self.explain_max_tokens,
            f"autointerp: explaining {len(plans)} latents",
        )
        for p, a in zip(plans, raw, strict=True):
            p["raw_explanation"], p["explanation"] = a, parse_explanation(a)

        # 2. LM scorers: every prompt of every latent in one batched pass
        lm_kinds = [k for k in self.scorers if k != "embedding"]
        scorer: ChatLM | None = None
        if lm_kinds:
            jobs: list[tuple[int, str, list[int]]] = []  # (plan index, scorer, labels) per prompt
            chats: list[Chat] = []
            for i, p in enumerate(plans):
                for kind in lm_kinds:
                    rng = random.Random(f"{self.seed}-{kind}-{p['latent']}")
                    items = (
                        detection_items(p["pos"], p["neg"], rng)
                        if kind == "detection"
                        else fuzzing_items(p["pos"], rng, self.mark_frac)
                    )
                    if self.scoring == "logprob":
                        pairs = [
                            (c, [y]) for c, y in yes_no_prompts(kind, p["explanation"], items, self.prompts)
                        ]
                    else:
                        pairs = classifier_prompts(
                            kind, p["explanation"], items, self.examples_per_prompt, self.prompts
                        )
                    for chat, labels in pairs:
                        jobs.append((i, kind, labels))
                        chats.append(chat)
            same = self.scorer is self.explainer
            scorer = explainer if same else self._client(self.scorer, cache_path, source.host)
            desc = f"autointerp: scoring ({', '.join(lm_kinds)}, {self.scoring})"
            answers: Sequence[str | float] = (
                self._yes_probability(scorer, chats, desc)
                if self.scoring == "logprob"
                else self._complete(scorer, chats, self.score_max_tokens, desc)
            )
            grouped: dict[tuple[int, str], tuple[list[list[int]], list[Any]]] = {}
            for (i, kind, labels), answer in zip(jobs, answers, strict=True):
                labs, ans = grouped.setdefault((i, kind), ([], []))
                labs.append(labels)
                ans.append(answer)
            for i, p in enumerate(plans):
                for kind in lm_kinds:
                    labs, ans = grouped.get((i, kind), ([], []))
                    p[kind] = (
                        score_probabilities([y for lab in labs for y in lab], ans)
                        if self.scoring == "logprob"
                        else score_answers(labs, ans)
                    )

        # 3. embedding similarity
        if "embedding" in self.scorers:
            embedder = self._embedder()
            for p in plans:
                p["embedding"] = embedding_score(embedder, p["explanation"], p["pos"], p["neg"])

        return self._result(plans, rec, skipped, folder, explainer, scorer)

    def _embedder(self) -> Any:
        if self.embedder is not None and callable(getattr(self.embedder, "encode", None)):
            return self.embedder
        from saelab.hosts.embedder import SentenceEmbedder

        return SentenceEmbedder(model_dir=self.embedder, progress=False)

    def _result(
        self,
        plans: list[dict[str, Any]],
        rec: FeatureRecords,
        skipped: dict[int, str],
        folder: Path,
        explainer: ChatLM,
        scorer: ChatLM | None,
    ) -> EvalResult:
        rows: list[dict[str, Any]] = []
        for p in plans:
            j = p["latent"]
            row: dict[str, Any] = {
                "latent": j,
                "density": float(rec.count[j]) / max(rec.n_tokens, 1),
                "explanation": p["explanation"],
                "n_activating": len(p["pos"]),
                "n_non_activating": len(p["neg"]),
            }
            for kind in self.scorers:
                v = p[kind]
                row[kind] = float(v) if kind == "embedding" else v.score
                if kind != "embedding":
                    if self.scoring == "logprob":
                        row[f"{kind}_auroc"] = v.auroc
                    row[f"{kind}_unparsed"] = v.n_unparsed
                    row[f"{kind}_items"] = v.n_items
            row["raw_explanation"] = p["raw_explanation"]
            rows.append(row)

        metrics: dict[str, float] = {"autointerp_n_latents": float(len(rows))}
        for kind in self.scorers:
            metrics[f"autointerp_{kind}"] = _nanmean([r[kind] for r in rows])
            if kind != "embedding" and self.scoring == "logprob":
                metrics[f"autointerp_{kind}_auroc"] = _nanmean([r[f"{kind}_auroc"] for r in rows])
            if kind != "embedding":
                n_items = sum(r[f"{kind}_items"] for r in rows)
                metrics[f"autointerp_{kind}_unparsed"] = sum(r[f"{kind}_unparsed"] for r in rows) / max(
                    n_items, 1
                )
        metrics["autointerp_empty_explanations"] = float(sum(not r["explanation"] for r in rows))

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "explanations.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        cols = [
            c
            for k in self.scorers
            for c in (k, f"{k}_auroc")
            if c == k or (k != "embedding" and self.scoring == "logprob")
        ]
        headers = ["latent", "density", "explanation", *cols]
        table = [
            [r["latent"], f"{r['density']:.2e}", r["explanation"], *(round(r[c], 3) for c in cols)]
            for r in rows
        ]
        data = {
            "latents": rows,
            "skipped": {str(j): why for j, why in skipped.items()},
            "explainer": explainer.model_id,
            "scorer": None if scorer is None else scorer.model_id,
            "scoring": self.scoring if scorer is not None else None,
            "n_tokens": rec.n_tokens,
            "window": list(rec.window),
            "settings": {
                "explain_top": self.explain_top,
                "explain_samples": self.explain_samples,
                "n_score": self.n_score,
                "examples_per_prompt": self.examples_per_prompt,
                "mark_frac": self.mark_frac,
                "temperature": self.temperature,
                "scoring": self.scoring,
                "seed": self.seed,
            },
        }
        return EvalResult(
            metrics=metrics, tables={"autointerp": Table(headers, table)}, data={"autointerp": data}
        )
