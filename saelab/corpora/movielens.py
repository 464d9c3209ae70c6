"""MovieLens (RecBole atomic files) as chronological per-user item sequences with leave-one-out splits.

Files are RecBole "atomic" TSVs whose header cells are `name:type` (`user_id:token`, `class:token_seq`).
`<dataset>.inter` holds (user_id, item_id, timestamp[, rating]); `<dataset>.item` holds the item side
(`movie_title`, `release_year`, and the genres in `class` for ml-100k or `genre` for ml-1m). The offline
default is MovieLens-100k from the `recbole==1.2.1` package; any folder with the same schema works.

Splits follow SASRec / ReChorus: per user, items sorted by time; the last item is the test target, the
one before it the validation target, everything earlier is training data (leave-one-out). Item ids are
mapped to 1..n_items; 0 is padding. Each item carries attributes for concept analysis: `genre:<g>`,
`decade:<1990s>` and `title:<word>` (title words seen in at least `min_word_items` items).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from jaxtyping import Bool, Int
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

_STOP = {
    "the", "and", "for", "with", "from", "that", "this", "are", "was", "les", "des", "der", "die", "das", "une",
    "del", "los", "las", "ii", "iii", "part", "not", "you", "your", "his", "her", "its", "our", "all",
}  # fmt: skip
_GENRE_FIELDS = ("class", "genre", "genres")
_TITLE_FIELDS = ("movie_title", "title")
_YEAR_FIELDS = ("release_year", "year")


def read_atomic(path: str | Path) -> dict[str, list[str]]:
    """Columns of a RecBole atomic file, keyed by field name without its `:type` suffix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: point data.corpus.data_dir at a RecBole-format dataset folder."
        )
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":")[0] for h in next(reader)]
        cols: dict[str, list[str]] = {h: [] for h in header}
        for row in reader:
            if not row:
                continue
            row = row + [""] * (len(header) - len(row))
            for h, v in zip(header, row, strict=False):
                cols[h].append(v)
    return cols


def _sort_key(token: str):
    return (0, int(token), "") if token.isdigit() else (1, 0, token)


def _first(cols: dict[str, list[str]], names: tuple[str, ...]) -> list[str] | None:
    return next((cols[n] for n in names if n in cols), None)


@dataclass
class Interactions:
    """Chronological item sequences per user plus item metadata and attributes.

    `sequences[u]` lists internal item ids (1..n_items) in time order. `item_attrs[i, a]` says whether
    item i has attribute `attr_names[a]` (row 0, padding, has none).
    """

    sequences: list[list[int]]
    user_ids: list[str]
    item_ids: list[str]  # raw id of each internal id; index 0 is "<pad>"
    titles: list[str]
    years: list[str]
    genres: list[list[str]]
    attr_names: list[str]
    item_attrs: Bool[Tensor, "n_items_1 n_attrs"]
    name: str = "ml-100k"
    fingerprint: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    def train_sequence(self, u: int) -> list[int]:
        """Items before the validation target (what the recommender trains on)."""
        return self.sequences[u][:-2]

    def eval_examples(self, split: str) -> tuple[list[list[int]], Int[Tensor, " n_users"]]:
        """(full histories, targets) of the leave-one-out `split` ("valid" or "test"), one per user."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}.")
        cut = -2 if split == "valid" else -1
        hist = [s[:cut] for s in self.sequences]
        tgt = torch.tensor([s[cut] for s in self.sequences], dtype=torch.long)
        return hist, tgt

    def attr_index(self, name: str) -> int:
        try:
            return self.attr_names.index(name)
        except ValueError:
            raise KeyError(f"unknown attribute {name!r}; e.g. {', '.join(self.attr_names[:8])}") from None


def load_interactions(
    data_dir: str | None = None,
    dataset: str = "ml-100k",
    min_seq_len: int = 5,
    min_rating: float | None = None,
    min_word_items: int = 5,
) -> Interactions:
    """Read `<data_dir>/<dataset>.inter` and `.item` into chronological sequences.

    `data_dir=None` is MovieLens-100k from the pinned recbole package. Users with fewer than
    `min_seq_len` interactions (≥ 3 are needed for train/valid/test) are dropped; with `min_rating`
    only ratings ≥ it count as interactions. Ties in time keep file order (a stable sort).
    """
    if min_seq_len < 3:
        raise ValueError(f"min_seq_len={min_seq_len}: leave-one-out needs at least 3 interactions per user.")
    if data_dir is None:
        from saelab.assets import package_file

        folder = package_file("recbole", f"dataset_example/{dataset}")
    else:
        folder = Path(data_dir).expanduser()
    inter = read_atomic(folder / f"{dataset}.inter")
    for need in ("user_id", "item_id", "timestamp"):
        if need not in inter:
            raise ValueError(f"{folder / (dataset + '.inter')} has no {need} column (found {sorted(inter)}).")
    users, items, times = inter["user_id"], inter["item_id"], [float(t) for t in inter["timestamp"]]
    keep: Sequence[int] = range(len(users))
    if min_rating is not None:
        if "rating" not in inter:
            raise ValueError("min_rating is set but the .inter file has no rating column.")
        keep = [i for i in keep if float(inter["rating"][i]) >= min_rating]
    by_user: dict[str, list[int]] = {}
    for i in keep:
        by_user.setdefault(users[i], []).append(i)
    by_user = {u: rows for u, rows in by_user.items() if len(rows) >= min_seq_len}
    if not by_user:
        raise ValueError(
            f"no user of {dataset} has {min_seq_len}+ interactions; lower data.corpus.min_seq_len."
        )
    raw_items = sorted({items[i] for rows in by_user.values() for i in rows}, key=_sort_key)
    index = {t: j + 1 for j, t in enumerate(raw_items)}
    user_ids = sorted(by_user, key=_sort_key)
    sequences = []
    for u in user_ids:
        rows = sorted(by_user[u], key=lambda i: times[i])  # stable: ties keep file order
        sequences.append([index[items[i]] for i in rows])

    n = len(raw_items) + 1
    titles, years = [""] * n, [""] * n
    genres: list[list[str]] = [[] for _ in range(n)]
    item_path = folder / f"{dataset}.item"
    if item_path.exists():
        meta = read_atomic(item_path)
        t_col, y_col, g_col = (
            _first(meta, _TITLE_FIELDS),
            _first(meta, _YEAR_FIELDS),
            _first(meta, _GENRE_FIELDS),
        )
        for r, raw in enumerate(meta.get("item_id", [])):
            j = index.get(raw)
            if j is None:
                continue
            titles[j] = t_col[r] if t_col else ""
            years[j] = y_col[r] if y_col else ""
            genres[j] = g_col[r].split() if g_col else []
    attr_names, item_attrs = item_attributes(titles, years, genres, min_word_items)
    fp = {
        "dataset": dataset,
        "n_users": len(sequences),
        "n_items": n - 1,
        "n_inter": sum(map(len, sequences)),
    }
    return Interactions(sequences, user_ids, ["<pad>", *raw_items], titles, years, genres, attr_names, item_attrs,
                        name=dataset, fingerprint=fp)  # fmt: skip


def title_words(title: str) -> list[str]:
    return [
        w
        for w in re.findall(r"[a-z0-9']+", title.lower())
        if len(w) >= 3 and w not in _STOP and not w.isdigit()
    ]


def item_attributes(
    titles: list[str], years: list[str], genres: list[list[str]], min_word_items: int = 5
) -> tuple[list[str], Bool[Tensor, "n_items_1 n_attrs"]]:
    """Attribute names and the item × attribute incidence (genres, release decade, frequent title words)."""
    per_item: list[set[str]] = []
    word_count: dict[str, int] = {}
    for t, y, g in zip(titles, years, genres, strict=True):
        attrs = {f"genre:{x}" for x in g if x and x != "unknown"}
        if y[:4].isdigit():
            attrs.add(f"decade:{int(y[:4]) // 10 * 10}s")
        words = {f"title:{w}" for w in title_words(t)}
        for w in words:
            word_count[w] = word_count.get(w, 0) + 1
        per_item.append(attrs | words)
    per_item[0] = set()
    keep = lambda a: not a.startswith("title:") or word_count[a] >= min_word_items  # noqa: E731
    names = sorted({a for s in per_item for a in s if keep(a)}, key=lambda a: (a.split(":")[0] != "genre", a))
    col = {a: j for j, a in enumerate(names)}
    mat = torch.zeros(len(per_item), len(names), dtype=torch.bool)
    for i, s in enumerate(per_item):
        for a in s:
            if a in col:
                mat[i, col[a]] = True
    return names, mat


def pad_left(seqs: list[list[int]], max_len: int) -> Int[Tensor, "n max_len"]:
    """The last `max_len` items of each sequence, left-padded with 0 (so the newest item is at the end)."""
    out = torch.zeros(len(seqs), max_len, dtype=torch.long)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        if s:
            out[r, max_len - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out


def exclusion_mask(histories: list[list[int]], targets: Tensor, n_items: int) -> Bool[Tensor, "n n_items_1"]:
    """Items to leave out of a full ranking: padding and everything already in the history, except the target."""
    mask = torch.zeros(len(histories), n_items + 1, dtype=torch.bool)
    mask[:, 0] = True
    for r, h in enumerate(histories):
        if h:
            mask[r, torch.tensor(h, dtype=torch.long)] = True
    mask[torch.arange(len(histories)), targets] = False
    return mask


def next_item_chunks(seqs: list[list[int]], max_len: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets) [n_chunks, max_len]: each sequence cut, from its end, into pieces of max_len+1 items.

    Every position of an input predicts the next item (target 0 = padding, ignored by the loss).
    """
    inputs, targets = [], []
    for s in seqs:
        end = len(s)
        while end >= 2:
            piece = s[max(0, end - max_len - 1) : end]
            inputs.append(piece[:-1])
            targets.append(piece[1:])
            end -= max_len
    return pad_left(inputs, max_len), pad_left(targets, max_len)


class NextItemDataModule(pl.LightningDataModule):
    """Training chunks and leave-one-out validation for a next-item recommender (SASRec).

    Train batches are `(inputs, targets)`; validation batches are `(history, target, exclude)` with the
    full-ranking exclusion mask of `exclusion_mask`.
    """

    def __init__(self, corpus: Interactions, max_len: int = 20, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.corpus, self.max_len, self.batch_size, self.seed = corpus, max_len, batch_size, seed
        train = [corpus.train_sequence(u) for u in range(corpus.n_users)]
        self.train_inputs, self.train_targets = next_item_chunks(train, max_len)
        hist, tgt = corpus.eval_examples("valid")
        self.valid = (pad_left(hist, max_len), tgt, exclusion_mask(hist, tgt, corpus.n_items))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        ds = TensorDataset(self.train_inputs, self.train_targets)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.valid), batch_size=512)
