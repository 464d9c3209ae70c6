"""Per-residue activations of a protein masked LM over annotated Swiss-Prot sequences.

The activation source of the protein recipe (Villegas Garcia & Ansuini, arXiv:2502.09135): Swiss-Prot
entries are parsed into residues with annotation labels (`saelab.corpora.swissprot`), cropped to the
host's context, split by sequence into train / validation, and passed once through the host up to the
hook layer. The data is small (tens of thousands of residues), so activations are held in memory
(and cached on disk under the asset cache, keyed by everything that determines them).

Activations are scaled by one constant s so that E‖s·x‖² = d_in over the training residues (the usual
SAE input normalisation, so one set of SAE hyper-parameters suits hosts of any scale); the splice and
the steering hook apply the same s and undo it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from saelab.corpora.swissprot import (
    DEFAULT_ANNOTATIONS,
    ProteinRecord,
    crop,
    emboss_files,
    label_names,
    parse_swissprot,
)
from saelab.hosts.masked_lm import MaskedLMHost


class _RandomBatches(IterableDataset):
    """Batch i is a seeded draw (with replacement) of training rows: a pure function of (seed, i)."""

    def __init__(self, acts: Tensor, batch_size: int, seed: int, start: int) -> None:
        self.acts, self.batch_size, self.seed, self.start = acts, batch_size, seed, start

    def __iter__(self):
        i = self.start
        while True:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + i * 2_654_435_761) % (2**63 - 1))
            yield {"acts": self.acts[torch.randint(len(self.acts), (self.batch_size,), generator=g)]}
            i += 1


class ProteinDataModule(pl.LightningDataModule):
    """Residue activations of `host` on annotated Swiss-Prot sequences.

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
        normalize: scale activations to E‖x‖² = d_in.
        cache: keep harvested activations on disk in the asset cache.
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
        self.normalize, self.cache, self.seed = bool(normalize), bool(cache), int(seed)
        self.position = 0
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
        train = raw[~self.is_val]
        self.scale = float((self.d_in / train.pow(2).sum(1).mean()).sqrt()) if self.normalize else 1.0
        self.acts: Float[Tensor, "n d_in"] = raw * self.scale
        self._ready = True

    def _cache_key(self, sequences: list[str]) -> str:
        h = hashlib.sha256()
        # the host's identity: its name, hook and a checksum of its weights
        weights = sum(float(p.double().abs().sum()) for p in self.host.model.parameters())
        key = {"host": self.host.name, "hook": self.host.hook, "weights": f"{weights:.6e}", "d_in": self.d_in}
        h.update(json.dumps(key, sort_keys=True).encode())
        for s in sequences:
            h.update(s.encode() + b"\n")
        return h.hexdigest()[:24]

    def _harvest(self, sequences: list[str]) -> tuple[Tensor, Tensor]:
        if not self.cache:
            return self.host.residue_activations(sequences, self.harvest_batch_size)
        from saelab.assets import cache_dir
        from saelab.files import atomic_write_bytes

        path = cache_dir() / "protein_acts" / f"{self._cache_key(sequences)}.pt"
        if path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                return blob["acts"].float(), blob["token_ids"]
            except Exception:  # a corrupt cache file is rebuilt rather than trusted
                path.unlink(missing_ok=True)
        acts, ids = self.host.residue_activations(sequences, self.harvest_batch_size)
        buf = io.BytesIO()
        torch.save({"acts": acts, "token_ids": ids}, buf)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return acts, ids

    # ------------------------------------------------------------------ views
    @property
    def train_acts(self) -> Float[Tensor, "n_train d_in"]:
        return self.acts[~self.is_val]

    @property
    def val_acts(self) -> Float[Tensor, "n_val d_in"]:
        return self.acts[self.is_val]

    def val_sequences(self) -> list[str]:
        return [self.records[i].sequence for i in self.val_seqs]

    # ------------------------------------------------------------------ loaders
    def _start(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else self.position

    def train_dataloader(self) -> DataLoader:
        self.setup()
        self.position = self._start()
        return DataLoader(
            _RandomBatches(self.train_acts, self.batch_size, self.seed, self.position), batch_size=None
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        v = self.val_acts
        batches = [{"acts": v[i : i + self.batch_size]} for i in range(0, len(v), self.batch_size)]
        return DataLoader(batches, batch_size=None)

    def state_dict(self) -> dict:
        return {"position": self._start()}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state.get("position", 0))
