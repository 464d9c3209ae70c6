"""Text activations: corpus → packed token contexts → causal-LM host activations → shuffled SAE batches.

Texts are tokenised without special tokens, joined with the EOS token and cut into contexts of
`context_len` tokens, each starting with BOS: [BOS, t_1, ..., t_{T−1}]. The BOS position (an attention
sink whose norm is several times the others) and padding never reach the SAE: `sae_mask` marks the
positions whose activations are harvested, and spliced evaluation keeps the original activation there.

Harvested activations go to the shared activation cache (`cache=True`, keyed by what determines them:
host, hook, dtype, corpus fingerprint, packing and token budget), so a second run or a parallel sweep job
reuses them. With `cache=False` the training stream runs the host on the fly. Training batches are a
pure function of (seed, batch index), so a resumed run (which starts at `trainer.global_step`) sees
exactly the batches an uninterrupted run would.
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

from saelab.data.cache import CacheDataset, build_cache

PACKING_VERSION = 1


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
    """Packed contexts: token ids, the attention mask (0 = padding) and the SAE mask (False = BOS/pad)."""

    input_ids: Int[Tensor, "n seq"]
    attention_mask: Int[Tensor, "n seq"]
    sae_mask: Bool[Tensor, "n seq"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Positions that reach the SAE."""
        return int(self.sae_mask.sum())

    def slice(self, i: int, j: int) -> Contexts:
        return Contexts(self.input_ids[i:j], self.attention_mask[i:j], self.sae_mask[i:j])


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
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        stream.extend(ids)
        if sep_id is not None:
            stream.append(sep_id)
        if need is not None and len(stream) >= need:
            break
    if not stream:
        raise ValueError("the corpus produced no tokens.")
    n_full = len(stream) // body
    if need is not None:
        n_full = min(n_full, need // body)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep_id or 0)
    rows, att = [], []
    chunks = [stream[i * body : (i + 1) * body] for i in range(n_full)] or [stream[:body]]
    for c in chunks:
        n_pad = body - len(c)
        prefix = [bos_id] if bos_id is not None else []
        rows.append(prefix + c + [pad] * n_pad)
        att.append([1] * (len(prefix) + len(c)) + [0] * n_pad)
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(att, dtype=torch.long)
    sae_mask = attention_mask.bool().clone()
    if bos_id is not None:
        sae_mask[:, 0] = False
    return Contexts(input_ids, attention_mask, sae_mask)


def harvest(
    host, contexts: Contexts, batch_size: int = 16, desc: str = "harvest", progress: bool = True
) -> Iterator[tuple[Float[Tensor, "n d_in"], Int[Tensor, " n"]]]:
    """Yield (acts, token_ids) chunks of the SAE positions, `batch_size` contexts per host forward."""
    bar = tqdm(
        total=contexts.n_tokens, desc=desc, unit="tok", unit_scale=True, leave=False, disable=not progress
    )
    try:
        for i in range(0, len(contexts), batch_size):
            c = contexts.slice(i, i + batch_size)
            h = host.activations(c.input_ids, c.attention_mask)  # (B, T, d_in)
            m = c.sae_mask.to(h.device)
            acts = h[m].float().cpu()  # (n, d_in): BOS and padding dropped
            bar.update(acts.shape[0])
            yield acts, c.input_ids[c.sae_mask]
    finally:
        bar.close()


class ActivationStore:
    """Harvested activations held in memory (cache=False); reads like `saelab.data.cache.ActivationCache`."""

    def __init__(self, acts: Float[Tensor, "n d_in"], token_ids: Int[Tensor, " n"]) -> None:
        self.acts, self.token_ids = acts, token_ids
        self.n_tokens, self.d_in = acts.shape[0], acts.shape[1]

    @classmethod
    def collect(cls, chunks) -> ActivationStore:
        acts, ids = zip(*chunks, strict=True)
        return cls(torch.cat(acts), torch.cat(ids))

    def batches(self, batch_size: int, shuffle: bool = False, epochs: int | None = 1, **_) -> Iterator[dict]:
        for i in range(0, self.n_tokens, batch_size):
            yield {
                "acts": self.acts[i : i + batch_size].float(),
                "token_ids": self.token_ids[i : i + batch_size],
            }

    def rows(self, idx, columns=None) -> dict:
        idx = torch.as_tensor(idx)
        return {"acts": self.acts[idx].numpy(), "token_ids": self.token_ids[idx].numpy()}


class _Ordered(IterableDataset):
    """The first `n_batches` batches of a store, in order (validation)."""

    def __init__(self, store, batch_size: int, n_batches: int | None) -> None:
        self.store, self.batch_size, self.n_batches = store, batch_size, n_batches

    def __iter__(self):
        for i, b in enumerate(self.store.batches(self.batch_size, shuffle=False, epochs=1)):
            if self.n_batches is not None and i >= self.n_batches:
                return
            yield b


class _Live(IterableDataset):
    """cache=False: contexts are drawn in a seeded order and run through the host as training needs them."""

    def __init__(self, dm: TextActivations, start: int) -> None:
        self.dm, self.start = dm, start

    def __iter__(self):
        dm, ctx = self.dm, self.dm.train_contexts
        bs = dm.batch_size
        per_fwd = max(1, dm.harvest_batch)
        pending: list[tuple[Tensor, Tensor]] = []
        step, i = 0, 0
        g = torch.Generator().manual_seed(dm.seed)
        order = torch.randperm(len(ctx), generator=g)
        while True:
            if i >= len(order):
                order, i = torch.randperm(len(ctx), generator=g), 0
            sel = order[i : i + per_fwd]
            i += per_fwd
            c = Contexts(ctx.input_ids[sel], ctx.attention_mask[sel], ctx.sae_mask[sel])
            pending.extend(harvest(dm.host, c, per_fwd, progress=False))
            acts = torch.cat([a for a, _ in pending])
            ids = torch.cat([t for _, t in pending])
            pending = []
            perm = torch.randperm(acts.shape[0], generator=g)
            n_full = acts.shape[0] // bs
            for b in range(n_full):
                if step >= self.start:
                    rows = perm[b * bs : (b + 1) * bs]
                    yield {"acts": acts[rows], "token_ids": ids[rows]}
                step += 1
            rest = perm[n_full * bs :]
            if rest.numel():
                pending.append((acts[rest], ids[rest]))


class TextActivations(pl.LightningDataModule):
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
        self.position = 0
        self._stores: dict[str, ActivationStore] = {}
        self._contexts: dict[str, Contexts] = {}

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

    def store(self, split: str):
        """The harvested activations of a split: an `ActivationCache` (cache=True) or an in-memory store.

        The host runs only on a cache miss; a cache hit never loads the model.
        """
        if split not in self._stores:
            corpus = self.corpus if split == "train" else self.val_corpus
            desc = f"harvest {split} ({getattr(corpus, 'name', 'texts')})"

            def producer():
                return harvest(self.host, self.contexts(split), self.harvest_batch, desc)

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

    def token_ids(self, split: str) -> Int[Tensor, " n"]:
        """Token id of every harvested activation row of a split (in storage order)."""
        st = self.store(split)
        return torch.from_numpy(st.rows(np.arange(st.n_tokens), ["token_ids"])["token_ids"].astype(np.int64))

    # ------------------------------------------------------------------ Lightning hooks
    def _start(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else self.position

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        self.position = self._start()
        if not self.cache:
            return DataLoader(_Live(self, self.position), batch_size=None)
        rank, world = self._rank()
        store = self.store("train")
        ds = CacheDataset(store.path, self.batch_size, self.seed, self.position, rank, world, epochs=None)
        return DataLoader(ds, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Ordered(self.store("val"), self.batch_size, self.val_batches), batch_size=None)

    def state_dict(self) -> dict:
        return {"position": self._start()}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state.get("position", 0))
