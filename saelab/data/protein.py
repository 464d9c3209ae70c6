"""Per-residue activations of a protein masked LM over annotated Swiss-Prot sequences.

The activation source of the protein recipe (Villegas Garcia & Ansuini, arXiv:2502.09135): Swiss-Prot
entries are parsed into residues with annotation labels (`saelab.corpora.swissprot`), cropped to the
host's context, split by sequence into train / validation, and passed once through the host up to the
hook layer. The data is small (tens of thousands of residues), so activations are held in memory; they
are harvested once into the shared activation cache (`saelab.data.cache`), keyed by what determines them
(host name, hook, a checksum of its weights, d_in and the sequences), so a rerun or a parallel sweep job
reads them back instead of running the host.

Training batches come from the shared stream (`saelab.data.stream`): a fresh seeded permutation of the
training residues per epoch, split by rank under DDP, resumed at the trainer's step. Activations are
scaled by one constant s (`act_scale`, alias `scale`) so that E‖s·x‖² = d_in over the training residues
(the usual SAE input normalisation, so one set of SAE hyper-parameters suits hosts of any scale); the
splice and the steering hook apply the same s and undo it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.utils.data import DataLoader

from saelab.corpora.swissprot import (
    DEFAULT_ANNOTATIONS,
    ProteinRecord,
    crop,
    emboss_files,
    label_names,
    parse_swissprot,
)
from saelab.data.cache import build_cache
from saelab.data.stream import Batches, Shuffled, StreamPosition, norm_scale, scaled
from saelab.hosts.masked_lm import MaskedLMHost


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a model's parameters and buffers (16 hex chars)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def sequences_fingerprint(sequences: list[str]) -> str:
    """sha256 over the sequences in order (newline-separated; residues are letters)."""
    h = hashlib.sha256()
    for s in sequences:
        h.update(s.encode() + b"\n")
    return h.hexdigest()[:16]


class ProteinDataModule(StreamPosition, pl.LightningDataModule):
    """Residue activations of `host` on annotated Swiss-Prot sequences.

    Training batches are {"acts": [batch, d_in], "token_ids": [batch]} (`acts` scaled by `act_scale`).
    After `setup()`: `records`, `label_names`, `labels` [n, n_labels], `seq_of`, `position_in_seq`,
    `token_ids` (per residue), `val_seqs`, `is_val`, and the scaled activations `acts`, `train_acts`,
    `val_acts`.

    Args:
        host: the masked LM host (built from `data.host`).
        d_in: activation width (the SAE reads it); checked against the host.
        files: Swiss-Prot flat files; None → the emboss-test entries from the asset cache.
        annotations: annotation types to label (see `swissprot.FEATURES`).
        min_subtype_residues: keep a sub-type label ("transmembrane:Helical") from this many residues.
        max_residues: sequences are cropped into windows of at most this many residues.
        max_sequences: keep only the first n windows (tiny runs).
        val_fraction: share of windows held out for evaluation and fidelity.
        batch_size: SAE training batch (residues).
        harvest_batch_size: sequences per host forward while harvesting.
        normalize: scale activations by s with E‖s·x‖² = d_in over the training residues.
        cache: keep harvested activations in the shared activation cache.
        cache_dir: root of the activation cache (None: `<saelab cache>/activations`).
        seed: split and batch order.
    """

    def __init__(
        self,
        host: MaskedLMHost,
        d_in: int,
        files: list[str] | None = None,
        annotations: list[str] | tuple[str, ...] = DEFAULT_ANNOTATIONS,
        min_subtype_residues: int = 100,
        max_residues: int = 500,
        max_sequences: int | None = None,
        val_fraction: float = 0.15,
        batch_size: int = 512,
        harvest_batch_size: int = 8,
        normalize: bool = True,
        cache: bool = True,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(d_in) != host.d_in:
            raise ValueError(
                f"data.d_in={d_in} but the host {host.name} has width {host.d_in}; set data.d_in."
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
        self.host, self.d_in = host, int(d_in)
        self.files = [str(f) for f in files] if files else None
        self.annotations = list(annotations)
        self.min_subtype_residues, self.max_residues = int(min_subtype_residues), int(max_residues)
        self.max_sequences, self.val_fraction = max_sequences, float(val_fraction)
        self.batch_size, self.harvest_batch_size = int(batch_size), int(harvest_batch_size)
        self.normalize, self.cache, self.cache_dir, self.seed = (
            bool(normalize),
            bool(cache),
            cache_dir,
            int(seed),
        )
        self.act_scale = 1.0
        self._ready = False

    # ------------------------------------------------------------------ harvesting
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        files = [Path(f) for f in self.files] if self.files else emboss_files()
        records = parse_swissprot(files, self.annotations, self.min_subtype_residues)
        limit = min(self.max_residues, self.host.max_residues)
        records = crop(records, limit)
        if self.max_sequences:
            records = records[: int(self.max_sequences)]
        self.records: list[ProteinRecord] = records
        self.label_names: list[str] = label_names(records)
        raw, ids = self._harvest([r.sequence for r in records])
        lengths = torch.tensor([len(r) for r in records])
        self.seq_of: Int[Tensor, " n"] = torch.repeat_interleave(torch.arange(len(records)), lengths)
        self.position_in_seq: Int[Tensor, " n"] = torch.cat([torch.arange(n) for n in lengths.tolist()])
        self.token_ids: Int[Tensor, " n"] = ids
        self.labels: Bool[Tensor, "n n_labels"] = torch.from_numpy(
            np.stack([np.concatenate([r.labels[a] for r in records]) for a in self.label_names], axis=1)
        )
        # split by sequence (residues of one protein are never on both sides)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(records), generator=g)
        n_val = max(1, round(self.val_fraction * len(records)))
        if n_val >= len(records):
            raise ValueError(f"{len(records)} sequences are too few to hold out a validation split.")
        self.val_seqs = sorted(perm[:n_val].tolist())
        self.is_val: Bool[Tensor, " n"] = torch.isin(self.seq_of, torch.tensor(self.val_seqs))
        self._raw: Float[Tensor, "n d_in"] = raw
        self.act_scale = norm_scale(raw[~self.is_val], self.d_in) if self.normalize else 1.0
        self._ready = True

    @property
    def scale(self) -> float:
        """Alias of `act_scale` (the protein recipe, fidelity and steering read it)."""
        return self.act_scale

    def cache_parts(self, sequences: list[str]) -> dict:
        """What determines the activations: the activation-cache key."""
        return {
            "host_id": self.host.name,
            "hook": str(self.host.hook),
            "corpus_fingerprint": sequences_fingerprint(sequences),
            "d_in": self.d_in,
            "extra": {"kind": "protein_residues", "weights": weights_checksum(self.host.model)},
        }

    def _harvest(self, sequences: list[str]) -> tuple[Tensor, Tensor]:
        if not self.cache:
            return self.host.residue_activations(sequences, self.harvest_batch_size)
        from saelab.assets import cache_dir

        def producer():
            return [self.host.residue_activations(sequences, self.harvest_batch_size)]

        root = Path(self.cache_dir) if self.cache_dir else cache_dir() / "activations"
        store = build_cache(root, producer, progress=False, **self.cache_parts(sequences))
        rows = store.rows(np.arange(store.n_tokens), ["acts", "token_ids"])
        return torch.from_numpy(rows["acts"]), torch.from_numpy(rows["token_ids"].astype(np.int64))

    # ------------------------------------------------------------------ views
    @property
    def acts(self) -> Float[Tensor, "n d_in"]:
        """Activations of every residue, scaled by `act_scale` (what the SAE reads)."""
        return scaled({"acts": self._raw}, self.act_scale)["acts"]

    @property
    def train_acts(self) -> Float[Tensor, "n_train d_in"]:
        return scaled({"acts": self._raw[~self.is_val]}, self.act_scale)["acts"]

    @property
    def val_acts(self) -> Float[Tensor, "n_val d_in"]:
        return scaled({"acts": self._raw[self.is_val]}, self.act_scale)["acts"]

    def val_sequences(self) -> list[str]:
        return [self.records[i].sequence for i in self.val_seqs]

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        self.setup()
        train = {"acts": self._raw[~self.is_val], "token_ids": self.token_ids[~self.is_val]}
        return self._train_loader(Shuffled(train, self.batch_size, self.seed), self.act_scale)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        v = self._raw[self.is_val]
        bs = self.batch_size
        batches = [scaled({"acts": v[i : i + bs]}, self.act_scale) for i in range(0, len(v), bs)]
        return DataLoader(Batches(batches), batch_size=None)
