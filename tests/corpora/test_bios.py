"""Labelled biographies and SHIFT's splits: the labelling rules on hand-written text, the splits' intended
correlation on a hand-built corpus, the offline stand-in's real counts, the LabHC schema read from a local
file, labels kept by subset/save/load/concat, and the bad-input messages."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from saelab.corpora.bios import (
    gender_of,
    group_counts,
    hf_bios,
    load_bios,
    offline_bios,
    profession_of,
    shift_splits,
    word_chunks,
)
from saelab.corpora.text import Corpus, concat


def test_gender_rule_needs_three_pronouns_and_a_two_to_one_majority():
    assert gender_of("He said his band was his life.") == "male"
    assert gender_of("She toured; her album made her famous. He produced it.") == "female"  # 3 vs 1
    assert gender_of("She and her brother: he and his wife.") is None  # 2 vs 2
    assert gender_of("He left.") is None  # too few


def test_profession_rule_takes_the_leading_keyword_class():
    assert profession_of("Her album and single topped the chart.") == "musician"
    assert profession_of("He starred in a film and a television series.") == "actor"
    assert profession_of("His album and his film and his song and his movie.") is None  # no 1.5x lead
    assert profession_of("She was born in Paris.") is None


def test_word_chunks_cover_every_word_once():
    text = " ".join(f"w{i}" for i in range(240))
    pieces = word_chunks(text, 100)
    assert [len(p.split()) for p in pieces] == [100, 140]  # the 40-word tail joins its predecessor
    assert " ".join(pieces) == text


def toy_corpus(n: int = 12) -> Corpus:
    """n persons in each of the four (profession, gender) groups, two documents each."""
    texts, ids, prof, gen, who = [], [], [], [], []
    for p in ("nurse", "professor"):
        for g in ("female", "male"):
            for k in range(n):
                for part in range(2):
                    texts.append(f"{p} {g} {k} {part}")
                    ids.append(f"{p}-{g}-{k}#{part}")
                    prof.append(p)
                    gen.append(g)
                    who.append(f"{p}-{g}-{k}")
    return Corpus("toy", texts, ids, {}, {"profession": prof, "gender": gen, "person": who})


def test_shift_splits_have_the_intended_correlation():
    c = toy_corpus()
    s = shift_splits(c, professions=("professor", "nurse"), genders=("male", "female"), min_group=2)
    amb = group_counts(s.ambiguous)
    # ambiguous: profession determines gender (professor ⇒ male, nurse ⇒ female)
    assert set(amb) == {("professor", "male"), ("nurse", "female")}
    # balanced: all four groups, equal sizes
    bal = group_counts(s.balanced)
    assert set(bal) == {(p, g) for p in ("professor", "nurse") for g in ("male", "female")}
    assert len(set(bal.values())) == 1
    assert s.counts["balanced"] == {k: v for k, v in ((f"{p}/{g}", n) for (p, g), n in bal.items())}
    # no document in both, and no person split across the two sets
    assert not set(s.ambiguous.ids) & set(s.balanced.ids)
    assert not set(s.ambiguous.label("person")) & set(s.balanced.label("person"))


def test_offline_stand_in_counts_and_splits():
    c = offline_bios()
    counts = group_counts(c)
    # the rules' real skew: far fewer female than male biographies in every class
    for p in ("musician", "actor", "athlete"):
        assert counts[(p, "male")] > 2 * counts[(p, "female")] > 0
    s = shift_splits(c)
    assert set(s.counts["balanced"].values()) == {60}
    assert s.counts["ambiguous"]["musician/female"] == 0 == s.counts["ambiguous"]["actor/male"]
    assert len(load_bios("offline")) == len(c)


def test_labels_survive_subset_save_load_and_concat(tmp_path):
    c = toy_corpus(2)
    sub = c.subset([0, 3, 5])
    assert sub.label("gender") == [c.labels["gender"][i] for i in (0, 3, 5)]
    back = Corpus.load(sub.save(tmp_path / "c.json"))
    assert back.labels == sub.labels and back.fingerprint == sub.fingerprint
    plain = Corpus("plain", ["x"], ["x1"])
    assert concat([sub, c]).label("profession")[:3] == sub.label("profession")
    assert concat([sub, plain]).labels == {}  # a field only some parts have is dropped


def test_hf_schema_read_from_a_local_file(tmp_path):
    rows = [
        {"hard_text": "She is a nurse at the clinic.", "profession": 13, "gender": 1},
        {"hard_text": "He teaches physics at the university.", "profession": 21, "gender": 0},
    ]
    f = tmp_path / "bios.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    c = load_bios(str(f))
    assert c.labels["profession"] == ["nurse", "professor"] and c.labels["gender"] == ["female", "male"]
    assert c.texts[0] == rows[0]["hard_text"]


def test_bad_inputs_name_the_field_or_the_counts(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"hard_text": "He is a nurse.", "profession": 13}))
    with pytest.raises(KeyError, match="no 'gender' field"):
        hf_bios(data_files=str(f))
    unlabelled = Corpus("plain", ["a"], ["a"], {}, {"profession": ["nurse"]})
    with pytest.raises(KeyError, match="no label field 'gender'.*profession"):
        shift_splits(unlabelled)
    with pytest.raises(ValueError, match="'surgeon' is not in.*nurse 48"):
        shift_splits(toy_corpus(), professions=("surgeon", "nurse"))
    c = toy_corpus()
    keep = [
        i
        for i, (p, g) in enumerate(zip(c.labels["profession"], c.labels["gender"]))
        if (p, g) != ("nurse", "male")
    ]
    with pytest.raises(ValueError, match="too few documents.*nurse/male: 0"):
        shift_splits(c.subset(keep), professions=("professor", "nurse"), genders=("male", "female"))
    assert Counter(c.labels["profession"])["nurse"] == 48
