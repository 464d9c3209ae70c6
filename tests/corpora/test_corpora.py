"""Offline corpora: loading, hash splits, seed/pool roles, markup stripping, configs, online fallback."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from saelab.corpora.text import CORPORA, Corpus, load_corpus, load_hf_corpus, split_of, strip_wiki_markup

CONF = Path(__file__).resolve().parents[2] / "conf" / "data" / "corpus"


def _expected_split(doc_id: str, test_frac: float = 0.2, seed: int = 0) -> str:
    u = int.from_bytes(hashlib.sha256(f"split:{seed}:{doc_id}".encode()).digest()[:8], "big") / 2.0**64
    return "test" if u < test_frac else "train"


@pytest.mark.parametrize("name", ["general", "physics"])
def test_splits_are_disjoint_complete_and_deterministic(name):
    full, train, test = load_corpus(name), load_corpus(name, "train"), load_corpus(name, "test")
    assert set(train.ids).isdisjoint(test.ids)
    assert set(train.ids) | set(test.ids) == set(full.ids)
    assert 0.1 < len(test) / len(full) < 0.3  # test_frac=0.2
    assert all(_expected_split(i) == "test" for i in test.ids)  # recomputed independently
    again = load_corpus(name, "train")
    assert again.ids == train.ids and again.fingerprint == train.fingerprint
    other = load_corpus(name, "test", split_seed=1)
    assert set(other.ids) != set(test.ids)
    assert split_of(test.ids[0]) == "test"


def test_sizes_sources_and_roles():
    general, physics = load_corpus("general"), load_corpus("physics")
    seed, pool = load_corpus("physics_seed"), load_corpus("physics_pool")
    assert len(general) > 15_000 and general.n_words > 3_000_000
    kept = {s: v["kept"] for s, v in general.provenance["sources"].items()}
    assert kept["boolq"] > 10_000 and kept["news"] > 3_000 and kept["xsum"] > 900 and kept["pubmedqa"] > 900
    assert 250 < len(physics) < 400
    # seed and pool partition the physics documents; the pool hides inside general, the seed does not
    assert set(seed.ids).isdisjoint(pool.ids) and set(seed.ids) | set(pool.ids) == set(physics.ids)
    assert set(pool.ids) <= set(general.ids) and set(seed.ids).isdisjoint(general.ids)
    # the test split is held out of seeds and pools alike
    assert set(load_corpus("physics_seed", "train").ids).isdisjoint(load_corpus("general", "test").ids)
    for name in CORPORA:
        assert len(load_corpus(name, max_docs=5)) == 5


def test_max_docs_is_a_stable_mixed_sample():
    full, few = load_corpus("general", "train"), load_corpus("general", "train", max_docs=300)
    assert few.ids == full.ids[:300]
    sources = {i.split(":", 1)[0] for i in few.ids}
    assert {"boolq", "news"} <= sources  # hash order mixes the sources
    assert (
        few.provenance["max_docs"] == 300
        and sum(v["kept"] for v in few.provenance["sources"].values()) == 300
    )


def test_documents_are_clean_text():
    posts = load_corpus("scispace")
    assert len(posts) > 80
    for t in posts.texts:
        assert not t.startswith(("From:", "Newsgroups:", "Path:")) and "\nSubject:" not in t[:200]
    wiki = load_corpus("enwiki")
    for t in wiki.texts:
        for markup in ("[[", "]]", "{{", "}}", "<ref", "'''", "&nbsp;", "[http"):
            assert markup not in t, (markup, t[:200])
        assert len(t) >= 200
    assert any(i.startswith("enwiki:Albedo#") for i in load_corpus("physics").ids)
    abstracts = load_corpus("pubmedqa")
    assert not any(t.startswith("Context (") for t in abstracts.texts)


def test_strip_wiki_markup_by_hand():
    src = (
        "{{Infobox|a={{nested|x}}}}'''Albedo''' is the [[diffuse reflection|diffuse reflectivity]] of a "
        "[[surface]].<ref name=a>cite</ref> See [http://x.org the site].[[File:A.png|thumb|a [[b]] c]]"
        "<!-- hidden -->\n{| class=t\n|-\n| cell\n|}\n* item &amp; more"
    )
    assert strip_wiki_markup(src).split("\n") == [
        "Albedo is the diffuse reflectivity of a surface. See the site.",
        "",
        "item & more",
    ]


def test_corpus_round_trip_and_errors(tmp_path):
    c = Corpus("toy", ["alpha text", "beta text"], ["a", "b"], {"made": "by hand"})
    c.save(tmp_path / "c.json")
    back = Corpus.load(tmp_path / "c.json")
    assert back.texts == c.texts and back.ids == c.ids and back.provenance == c.provenance
    assert back.fingerprint == c.fingerprint
    assert Corpus("toy", ["alpha text", "beta text!"], ["a", "b"]).fingerprint != c.fingerprint
    assert c.subset([1]).ids == ["b"]
    with pytest.raises(ValueError, match="unique"):
        Corpus("dup", ["x", "y"], ["a", "a"])
    with pytest.raises(ValueError, match="unknown corpus 'owt'.*general"):
        load_corpus("owt")
    with pytest.raises(ValueError, match="split"):
        load_corpus("general", split="validation")


def test_configs_instantiate():
    for name in ("general", "physics", "physics_seed", "physics_pool"):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        cfg.max_docs = 7
        c = instantiate(cfg)
        assert isinstance(c, Corpus) and len(c) == 7
    seed = instantiate(OmegaConf.load(CONF / "physics_seed.yaml"))
    assert len(seed) == 32 and seed.name == "physics_seed/train"


def test_online_corpus_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(ImportError, match="pip install datasets.*offline corpus"):
        load_hf_corpus("Skylion007/openwebtext")


def test_online_corpus_reads_filters_and_explains_offline(monkeypatch):
    import types

    rows = [
        {"id": "a1", "abstract": "Dark matter halos.", "categories": "astro-ph.CO"},
        {"id": "a2", "abstract": "Protein folding.", "categories": "q-bio.BM"},
        {"id": "a3", "abstract": "  ", "categories": "hep-th"},
        {"id": "a4", "abstract": "Quantum error correction.", "categories": "quant-ph cs.IT"},
        {"id": "a5", "abstract": "Lattice QCD.", "categories": "hep-lat"},
    ]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, name, split, streaming: iter(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    c = load_hf_corpus(
        "x/arxiv",
        text_field="abstract",
        id_field="id",
        filter_field="categories",
        filter_contains=["astro-ph", "hep-", "quant-ph"],
        max_docs=2,
    )
    assert c.ids == ["x/arxiv:a1", "x/arxiv:a4"] and c.texts == [
        "Dark matter halos.",
        "Quantum error correction.",
    ]

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'x/arxiv' on the Hub")

    fake.load_dataset = offline
    with pytest.raises(ConnectionError, match="network access.*offline, pick one of"):
        load_hf_corpus("x/arxiv")


def test_general_nobio_is_general_without_pubmedqa():
    general, nobio = load_corpus("general", "train"), load_corpus("general_nobio", "train")
    assert nobio.ids == [i for i in general.ids if not i.startswith("pubmedqa:")]  # same order, same split
    assert "pubmedqa" not in nobio.provenance["sources"]
    assert set(load_corpus("physics_pool", "train").ids) <= set(nobio.ids)  # the physics pool stays hidden
    assert set(load_corpus("physics_seed").ids).isdisjoint(load_corpus("general_nobio").ids)
    cfg = OmegaConf.load(CONF / "general_nobio.yaml")
    cfg.max_docs = 7
    assert instantiate(cfg).ids == nobio.ids[:7]


def test_concat_keeps_order_and_the_first_copy_of_a_repeat():
    from saelab.corpora.text import concat

    a = Corpus("a", ["one", "two"], ["1", "2"])
    b = Corpus("b", ["two again", "three"], ["2", "3"])
    c = concat([a, b])
    assert c.name == "a+b" and c.ids == ["1", "2", "3"] and c.texts == ["one", "two", "three"]
    assert c.provenance["duplicates_dropped"] == 1
    assert [p["docs"] for p in c.provenance["concat"]] == [2, 2]
    assert c.provenance["concat"][1]["fingerprint"] == b.fingerprint
    assert concat([b, a], "mix").ids == ["2", "3", "1"]
