"""Text activations: corpus → packed token contexts → causal-LM host activations → shuffled SAE batches.

Texts are tokenised without special tokens, joined with the EOS token and cut into contexts of
`context_len` tokens, each starting with BOS: [BOS, t_1, ..., t_{T−1}]. The BOS position (an attention
sink whose norm is several times the others) and padding never reach the SAE: `sae_mask` marks the
positions whose activations are harvested, and spliced evaluation keeps the original activation there.

Harvested activations go to the shared activation cache (`cache=True`, keyed by what determines them:
host, hook, dtype, corpus fingerprint, packing and token budget), so a second run or a parallel sweep job
reuses them; the cache's own stream (`CacheDataset`) reads them in a seeded order, split by rank. With
`cache=False` the training stream runs the host on the fly (`_Live`, a source of the shared stream in
`saelab.data.stream`), also split by rank. Either way training batches are {"acts", "token_ids"}, a pure
function of (seed, step, rank, world), so a resumed run (which starts at `trainer.global_step`) sees
exactly the batches an uninterrupted run would. With `normalize`, "acts" of training and validation
batches are scaled by `act_scale` (E‖s·x‖² = d_in, fit on the first `NORM_SAMPLE_ROWS` training rows).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from saelab.data.cache import ActivationCache, CacheDataset, build_cache
from saelab.data.stream import NORM_SAMPLE_ROWS, StreamPosition, epoch_permutation, norm_scale, scaled

PACKING_VERSION = 2  # 2: every harvested row carries its document id and position ("doc_id", "doc_pos")


def corpus_texts(corpus) -> list[str]:
    """The texts of a corpus object (anything with `.texts`) or a plain sequence of strings."""
    texts = getattr(corpus, "texts", corpus)
    if texts is None or isinstance(texts, str):
        raise TypeError("a corpus must be a Corpus (with .texts) or a list of strings.")
    texts = list(texts)
    if not texts:
        raise ValueError(f"corpus {getattr(corpus, 'name', '')!r} is empty: check its source and split.")
    return texts


def fingerprint(texts: Sequence[str]) -> str:
    """sha256 over the texts (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Contexts:
    """Packed contexts: token ids, the attention mask (0 = padding) and the SAE mask (False = BOS/pad).

    `doc_ids` / `doc_pos` (from `pack`): per position, the index of its text in the corpus and its token
    position in that text (the separator after a text counts as that text's last position); −1 on BOS
    and padding. A text longer than a context continues in the next one, so its positions keep counting.
    """

    input_ids: Int[Tensor, "n seq"]
    attention_mask: Int[Tensor, "n seq"]
    sae_mask: Bool[Tensor, "n seq"]
    doc_ids: Int[Tensor, "n seq"] | None = None
    doc_pos: Int[Tensor, "n seq"] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Positions that reach the SAE."""
        return int(self.sae_mask.sum())

    def select(self, idx) -> Contexts:
        """The contexts at `idx` (a slice, index tensor or list), every field alike."""

        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return Contexts(
            self.input_ids[idx],
            self.attention_mask[idx],
            self.sae_mask[idx],
            part(self.doc_ids),
            part(self.doc_pos),
        )

    def slice(self, i: int, j: int) -> Contexts:
        return self.select(slice(i, j))

    def columns(self) -> dict[str, Tensor]:
        """The per-position integer columns a harvest stores with each row (those this object has)."""
        cols = {"doc_id": self.doc_ids, "doc_pos": self.doc_pos}
        return {k: v for k, v in cols.items() if v is not None}


@dataclass(frozen=True)
class DocumentMeans:
    """Per-document means (`TextActivations.per_document`): row i is document `doc_ids[i]` of the corpus."""

    doc_ids: Int[Tensor, " n_docs"]
    counts: Int[Tensor, " n_docs"]  # harvested positions per document
    acts: Float[Tensor, "n_docs d_in"]
    codes: Float[Tensor, "n_docs d_sae"] | None  # host units (÷ act_scale); None without an SAE


def pack(
    tokenizer,
    texts: Sequence[str],
    context_len: int,
    bos_id: int | None,
    sep_id: int | None,
    max_tokens: int | None,
) -> Contexts:
    """Tokenise `texts`, join them with `sep_id` and cut into [BOS] + (context_len − 1)-token contexts.

    Stops once `max_tokens` SAE positions are collected (None = all). The last partial context is
    right-padded (attention 0) only when no full context exists; otherwise it is dropped.
    """
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2, got {context_len}.")
    body = context_len - 1 if bos_id is not None else context_len
    need = None if max_tokens is None else math.ceil(max_tokens / body) * body
    stream: list[int] = []
    docs: list[int] = []  # per stream token: its text's index
    pos: list[int] = []  # and its position in that text
    for d, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        if sep_id is not None:
            ids = [*ids, sep_id]
        stream.extend(ids)
        docs.extend([d] * len(ids))
        pos.extend(range(len(ids)))
        if need is not None and len(stream) >= need:
            break
    if not stream:
        raise ValueError("the corpus produced no tokens.")
    n_full = len(stream) // body
    if need is not None:
        n_full = min(n_full, need // body)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep_id or 0)
    rows, att, row_docs, row_pos = [], [], [], []
    spans = [(i * body, (i + 1) * body) for i in range(n_full)] or [(0, body)]
    prefix = [bos_id] if bos_id is not None else []
    none = [-1] * len(prefix)
    for a, b in spans:
        c = stream[a:b]
        n_pad = body - len(c)
        rows.append(prefix + c + [pad] * n_pad)
        att.append([1] * (len(prefix) + len(c)) + [0] * n_pad)
        row_docs.append(none + docs[a:b] + [-1] * n_pad)
        row_pos.append(none + pos[a:b] + [-1] * n_pad)
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(att, dtype=torch.long)
    sae_mask = attention_mask.bool().clone()
    if bos_id is not None:
        sae_mask[:, 0] = False
    return Contexts(
        input_ids,
        attention_mask,
        sae_mask,
        torch.tensor(row_docs, dtype=torch.long),
        torch.tensor(row_pos, dtype=torch.long),
    )


def harvest(
    host,
    contexts: Contexts,
    batch_size: int = 16,
    desc: str = "harvest",
    progress: bool = True,
    d_in: int | None = None,
) -> Iterator[tuple[Float[Tensor, "n d_in"], Int[Tensor, " n"], dict[str, Tensor]]]:
    """Yield (acts, token_ids, columns) chunks of the SAE positions, `batch_size` contexts per host forward.

    `columns`: the contexts' per-position columns at those positions ("doc_id", "doc_pos" when packed).
    `d_in`: the width the caller declared (`data.d_in`), checked against the host's activations.
    """
    bar = tqdm(
        total=contexts.n_tokens, desc=desc, unit="tok", unit_scale=True, leave=False, disable=not progress
    )
    try:
        for i in range(0, len(contexts), batch_size):
            c = contexts.slice(i, i + batch_size)
            h = host.activations(c.input_ids, c.attention_mask)  # (B, T, d_in)
            if d_in is not None and h.shape[-1] != d_in:
                raise ValueError(
                    f"the host's activations have width {h.shape[-1]}, but data.d_in={d_in}: set "
                    f"data.d_in={h.shape[-1]}, or drop the data.d_in override (it follows data.host.d_in)."
                )
            m = c.sae_mask.to(h.device)
            acts = h[m].float().cpu()  # (n, d_in): BOS and padding dropped
            bar.update(acts.shape[0])
            yield acts, c.input_ids[c.sae_mask], {k: v[c.sae_mask] for k, v in c.columns().items()}
    finally:
        bar.close()


class ActivationStore:
    """Harvested activations held in memory (cache=False); `rows` and `columns` read like `ActivationCache`'s."""

    def __init__(
        self,
        acts: Float[Tensor, "n d_in"],
        token_ids: Int[Tensor, " n"],
        extras: dict[str, Tensor] | None = None,
    ) -> None:
        self.acts, self.token_ids = acts, token_ids
        self.n_tokens, self.d_in = acts.shape[0], acts.shape[1]
        self._cols = {"acts": acts, "token_ids": token_ids, **(extras or {})}
        self.columns = list(self._cols)

    @classmethod
    def collect(cls, chunks) -> ActivationStore:
        acts, ids, extras = zip(*chunks, strict=True)
        return cls(torch.cat(acts), torch.cat(ids), {k: torch.cat([e[k] for e in extras]) for k in extras[0]})

    def rows(self, idx, columns=None) -> dict:
        idx = torch.as_tensor(idx)
        return {c: self._cols[c][idx].numpy() for c in (columns if columns is not None else self.columns)}


class _Ordered(IterableDataset):
    """The first `n_batches` batches of a store, rows in storage order (validation)."""

    def __init__(self, store, batch_size: int, n_batches: int | None, act_scale: float = 1.0) -> None:
        self.store, self.batch_size, self.n_batches, self.act_scale = store, batch_size, n_batches, act_scale

    def __iter__(self):
        n, bs = self.store.n_tokens, self.batch_size
        for i, start in enumerate(range(0, n, bs)):
            if self.n_batches is not None and i >= self.n_batches:
                return
            rows = self.store.rows(np.arange(start, min(start + bs, n)))
            b = {k: torch.from_numpy(v.astype(np.int64)) for k, v in rows.items() if k != "acts"}
            b["acts"] = torch.from_numpy(rows["acts"].astype(np.float32, copy=False))
            yield scaled(b, self.act_scale)


class _Live:
    """cache=False: the host runs as training needs it; global batch g comes from one harvested *window*.

    Epoch e orders the training contexts by a seeded permutation π_e (`epoch_permutation`) and reads their
    SAE positions as one row sequence. Window w of the epoch is its rows [w·m·bs, (w+1)·m·bs): harvested by
    running the host on the contexts that overlap it (about m·bs / (context_len − 1) + 2), its rows shuffled
    by a permutation seeded by (seed, e, w); batch j of the window is the shuffled rows [j·bs, (j+1)·bs).
    So g = (e·n_windows + w)·m + j, every row is read at most once per epoch, and with the stream's
    `group=m` each window is harvested once, by the one rank that trains on its m batches.
    """

    _order: Int[Tensor, " n_contexts"] | None  # epoch `_epoch`'s context order π_e
    _cum: Int[Tensor, " n_contexts_plus_1"] | None  # cumulative SAE positions of the contexts in that order
    _key: tuple[int, int] | None  # (epoch, window) held in `_window`
    _window: tuple[Tensor, Tensor, Tensor] | None  # that window's (acts, token_ids, row permutation)

    def __init__(
        self,
        host,
        contexts: Contexts,
        batch_size: int,
        harvest_batch: int,
        seed: int,
        d_in: int | None = None,
    ) -> None:
        self.host, self.contexts, self.batch_size, self.d_in = host, contexts, int(batch_size), d_in
        self.harvest_batch, self.seed = max(1, int(harvest_batch)), int(seed)
        self.lengths = contexts.sae_mask.sum(1)  # SAE positions per context
        self.n = int(self.lengths.sum())
        if self.n < self.batch_size:
            raise ValueError(
                f"the training contexts hold {self.n} SAE positions, fewer than "
                f"batch_size={self.batch_size}: lower data.batch_size or give the corpus more text."
            )
        # a window is about one host forward's worth of rows (harvest_batch contexts), in whole batches
        per_fwd = self.harvest_batch * self.n // len(contexts)
        self.m = max(1, min(per_fwd // self.batch_size, self.n // self.batch_size))
        self.window_rows = self.m * self.batch_size
        self.n_windows = self.n // self.window_rows
        self._epoch, self._order, self._cum = -1, None, None
        self._key, self._window = None, None

    def _epoch_layout(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(π_e, cumulative SAE positions) of epoch `epoch`, kept while the stream is inside it."""
        order, cum = self._order, self._cum
        if order is None or cum is None or epoch != self._epoch:
            order = epoch_permutation(len(self.contexts), self.seed, epoch)
            cum = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths[order].cumsum(0)])
            self._epoch, self._order, self._cum = epoch, order, cum
        return order, cum

    def rows(self, epoch: int, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """(acts, token_ids) of rows [start, stop) of epoch `epoch`'s row sequence (runs the host)."""
        order, cum = self._epoch_layout(epoch)
        k0 = int(torch.searchsorted(cum, start, right=True)) - 1
        k1 = int(torch.searchsorted(cum, stop, right=False))
        sel = order[k0:k1]
        c = self.contexts.select(sel)
        chunks = harvest(self.host, c, self.harvest_batch, progress=False, d_in=self.d_in)
        acts, ids, _ = zip(*chunks, strict=True)
        off = start - int(cum[k0])
        return torch.cat(acts)[off : off + stop - start], torch.cat(ids)[off : off + stop - start]

    def __call__(self, g: int) -> dict[str, Tensor]:
        gw, j = divmod(g, self.m)
        epoch, w = divmod(gw, self.n_windows)
        window = self._window
        if window is None or self._key != (epoch, w):
            acts, ids = self.rows(epoch, w * self.window_rows, (w + 1) * self.window_rows)
            seed = ((self.seed * 1_000_003 + epoch) * 2_654_435_761 + w) % (2**63 - 1)
            perm = torch.randperm(self.window_rows, generator=torch.Generator().manual_seed(seed))
            window = (acts, ids, perm)
            self._key, self._window = (epoch, w), window
        acts, ids, perm = window
        r = perm[j * self.batch_size : (j + 1) * self.batch_size]
        return {"acts": acts[r], "token_ids": ids[r]}


class TextActivations(StreamPosition, pl.LightningDataModule):
    """Activations of a causal-LM host on a text corpus, as shuffled {"acts", "token_ids"} batches.

    Args:
        host: a `saelab.hosts.causal_lm.CausalLMHost` (or any host with `activations`, `tokenizer`,
            `bos_id`, `identity`, `d_in`).
        corpus: training texts (a Corpus or a list of strings).
        val_corpus: held-out texts for validation and evaluation.
        d_in: declared activation width (checked against the host).
        context_len: tokens per packed context, BOS included.
        train_tokens: SAE positions harvested from `corpus` (the training pool; batches cycle over it).
        val_tokens: SAE positions harvested from `val_corpus`.
        batch_size: activations per training batch.
        harvest_batch: contexts per host forward.
        cache: keep harvested activations in the shared activation cache (else stream from the host).
        cache_dir: root of the activation cache (default `<saelab cache>/activations`).
        val_batches: batches per validation pass (None = all of `val_tokens`).
        seed: shuffling seed.
        normalize: scale "acts" by s with E‖s·x‖² = d_in (`act_scale`, fit on the first
            `NORM_SAMPLE_ROWS` training rows of the stream's order).
    """

    def __init__(
        self,
        host,
        corpus,
        val_corpus=None,
        d_in: int | None = None,
        context_len: int = 128,
        train_tokens: int = 100_000,
        val_tokens: int = 8_192,
        batch_size: int = 512,
        harvest_batch: int = 16,
        cache: bool = True,
        cache_dir: str | None = None,
        val_batches: int | None = None,
        seed: int = 0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if train_tokens < batch_size:
            raise ValueError(f"train_tokens={train_tokens} is smaller than batch_size={batch_size}.")
        self.host, self.corpus, self.val_corpus = host, corpus, val_corpus
        self.d_in = int(d_in) if d_in is not None else int(host.d_in)
        self.context_len, self.train_tokens, self.val_tokens = (
            int(context_len),
            int(train_tokens),
            int(val_tokens),
        )
        self.batch_size, self.harvest_batch = int(batch_size), int(harvest_batch)
        self.cache, self.cache_dir, self.val_batches, self.seed = (
            bool(cache),
            cache_dir,
            val_batches,
            int(seed),
        )
        self.normalize = bool(normalize)
        self._act_scale: float | None = None  # fit on first use (`act_scale`)
        self._stores: dict[str, ActivationCache | ActivationStore] = {}
        self._contexts: dict[str, Contexts] = {}
        self._live: _Live | None = None

    # ------------------------------------------------------------------ contexts and keys
    def contexts(self, split: str) -> Contexts:
        """Packed contexts of the "train" (corpus) or "val" (val_corpus) split, sized to its token budget."""
        if split not in self._contexts:
            corpus = self.corpus if split == "train" else self.val_corpus
            if corpus is None:
                raise ValueError(
                    "TextActivations has no val_corpus: set data.val_corpus to a held-out split."
                )
            tok = self.host.tokenizer
            budget = self.train_tokens if split == "train" else self.val_tokens
            self._contexts[split] = pack(
                tok, corpus_texts(corpus), self.context_len, self.host.bos_id, tok.eos_token_id, budget
            )
        return self._contexts[split]

    @property
    def train_contexts(self) -> Contexts:
        return self.contexts("train")

    def key(self, split: str) -> dict:
        """What determines the activations of a split (the activation-cache key)."""
        corpus = self.corpus if split == "train" else self.val_corpus
        return {
            "kind": "text_activations",
            "host": self.host.identity,
            "corpus": getattr(corpus, "name", "texts"),
            "corpus_fingerprint": getattr(corpus, "fingerprint", None) or fingerprint(corpus_texts(corpus)),
            "context_len": self.context_len,
            "tokens": self.train_tokens if split == "train" else self.val_tokens,
            "packing": PACKING_VERSION,
        }

    def store(self, split: str) -> ActivationCache | ActivationStore:
        """The harvested activations of a split: an `ActivationCache` (cache=True) or an in-memory store.

        The host runs only on a cache miss; a cache hit never loads the model.
        """
        if split not in self._stores:
            corpus = self.corpus if split == "train" else self.val_corpus
            desc = f"harvest {split} ({getattr(corpus, 'name', 'texts')})"

            def producer():
                return harvest(self.host, self.contexts(split), self.harvest_batch, desc, d_in=self.d_in)

            store: ActivationCache | ActivationStore
            if self.cache:
                from saelab.assets import cache_dir

                k = self.key(split)
                root = Path(self.cache_dir) if self.cache_dir else cache_dir() / "activations"
                store = build_cache(
                    root,
                    producer,
                    host_id=json.dumps(k["host"], sort_keys=True),
                    hook=str(k["host"]["hook"]),
                    corpus_fingerprint=k["corpus_fingerprint"],
                    d_in=self.d_in,
                    extra={"context_len": k["context_len"], "tokens": k["tokens"], "packing": k["packing"]},
                    progress=False,  # harvest() shows its own bar
                )
            else:
                store = ActivationStore.collect(producer())
            if store.d_in != self.d_in:
                raise ValueError(f"host activations have width {store.d_in}, but data.d_in={self.d_in}.")
            self._stores[split] = store
        return self._stores[split]

    def _cached(self, split: str) -> ActivationCache:
        """The activation cache of a split (cache=True only: with cache=False nothing is cached)."""
        store = self.store(split)
        if not isinstance(store, ActivationCache):
            raise TypeError(f"data.cache=false: the {split} activations are held in memory, not cached.")
        return store

    def token_ids(self, split: str) -> Int[Tensor, " n"]:
        """Token id of every harvested activation row of a split (in storage order)."""
        st = self.store(split)
        return torch.from_numpy(st.rows(np.arange(st.n_tokens), ["token_ids"])["token_ids"].astype(np.int64))

    def column(self, split: str, name: str) -> Int[Tensor, " n"]:
        """An integer column ("token_ids", "doc_id", "doc_pos") of every harvested row of a split."""
        st = self.store(split)
        if name not in st.columns:
            raise KeyError(
                f"the {split} activations have no column {name!r}; they have {', '.join(st.columns)}."
            )
        return torch.from_numpy(st.rows(np.arange(st.n_tokens), [name])[name].astype(np.int64))

    @torch.no_grad()
    def per_document(self, split: str = "val", sae=None, chunk_rows: int = 8192) -> DocumentMeans:
        """Per document of a split: the mean of its harvested activations and (with `sae`) of its SAE codes.

        One streamed pass over the split's rows (cached or in memory); the SAE is fed s·x (s = `act_scale`)
        and its codes are returned in host units (÷ s), so Σ_j codes_j W_dec[j] + b_dec / s is the mean
        reconstruction. A document cut across contexts is pooled over all of its pieces.
        """
        st = self.store(split)
        n = st.n_tokens
        docs = self.column(split, "doc_id")
        n_docs = int(docs.max()) + 1
        counts = torch.bincount(docs, minlength=n_docs)
        acts_sum = torch.zeros(n_docs, self.d_in, dtype=torch.float64)
        codes_sum = None if sae is None else torch.zeros(n_docs, int(sae.W_dec.shape[0]), dtype=torch.float64)
        s = self.act_scale
        for i in range(0, n, chunk_rows):
            idx = np.arange(i, min(i + chunk_rows, n))
            x = torch.from_numpy(st.rows(idx, ["acts"])["acts"].astype(np.float32, copy=False))
            d = docs[i : i + len(idx)]
            acts_sum.index_add_(0, d, x.double())
            if sae is not None and codes_sum is not None:
                W = sae.W_dec
                f = sae.encode((x * s).to(W.device, W.dtype)).float().cpu()
                codes_sum.index_add_(0, d, f.double())
        keep = counts > 0
        c = counts[keep].double()[:, None]
        codes = None if codes_sum is None else (codes_sum[keep] / c / s).float()
        return DocumentMeans(
            torch.nonzero(keep).squeeze(1), counts[keep], (acts_sum[keep] / c).float(), codes
        )

    @property
    def act_scale(self) -> float:
        """s with E‖s·x‖² = d_in over the first `NORM_SAMPLE_ROWS` training rows; 1.0 unless `normalize`."""
        s = self._act_scale
        if s is None:
            if not self.normalize:
                s = 1.0
            elif self.cache:
                store = self._cached("train")
                first = next(
                    store.batches(min(store.n_tokens, NORM_SAMPLE_ROWS), self.seed, columns=["acts"])
                )
                s = norm_scale(first["acts"], self.d_in)
            else:
                live = self.live()
                s = norm_scale(live.rows(0, 0, min(live.n, NORM_SAMPLE_ROWS))[0], self.d_in)
            self._act_scale = s
        return s

    def live(self) -> _Live:
        """The cache=False training source (contexts run through the host as training reads them)."""
        if self._live is None:
            self._live = _Live(
                self.host, self.train_contexts, self.batch_size, self.harvest_batch, self.seed, self.d_in
            )
        return self._live

    # ------------------------------------------------------------------ Lightning hooks
    def train_dataloader(self) -> DataLoader:
        if not self.cache:
            live = self.live()
            return self._train_loader(live, self.act_scale, group=live.m)
        store = self._cached("train")

        def stream(start: int, rank: int, world: int) -> CacheDataset:
            return CacheDataset(
                store.path,
                self.batch_size,
                self.seed,
                start,
                rank,
                world,
                epochs=None,
                columns=["acts", "token_ids"],
            )

        return self._split_loader(stream, self.act_scale)

    def val_dataloader(self) -> DataLoader:
        val = _Ordered(self.store("val"), self.batch_size, self.val_batches, self.act_scale)
        return DataLoader(val, batch_size=None)
