"""The one training stream of every activation source: resume position, rank split, seeded order, one
batch format and optional input normalisation.

A *source* is a function `batch(g) -> {"acts": [batch, d_in], <column>: [batch, ...], ...}` of the global
batch index g, pure in (seed, g). `BatchStream` turns it into what one rank trains on:

    rank r of W, at global step s, reads global batch g = s·W + r          (s = start, start + 1, ...)

so the W ranks of a step read distinct global batches, and a run resumed at step s (the trainer's
`global_step`, or the position restored by `load_state_dict`) reads exactly the tail of the batches an
uninterrupted run reads. With `group=m` (for sources whose batches come m at a time from one expensive
read, e.g. one host forward), consecutive runs of m global batches go to one rank instead:
g = ((s div m)·W + r)·m + (s mod m); for W = 1 both rules give g = s.

`Shuffled` is the source over a table of rows: with nb = ⌊n / batch_size⌋ batches per epoch, global batch g
is batch i = g mod nb of epoch e = g div nb, the rows perm_e[i·bs : (i+1)·bs], perm_e a fresh permutation of
the n rows seeded by (seed, e). Every row is read at most once per epoch (the n mod bs left over differ
between epochs), and the W ranks' batches of one epoch are disjoint.

Normalisation (`norm_scale`): one scalar s fit on training rows so that E‖s·x‖² = d_in,

    s = sqrt(d_in / mean_n ‖x_n‖²),

the usual SAE input normalisation that lets one set of SAE hyper-parameters suit hosts of any scale.
(SAELens's `ActivationScaler` computes sqrt(d_in) / mean_n ‖x_n‖, i.e. E‖s·x‖ = sqrt(d_in); the two agree
when all rows have the same norm.) The stream multiplies "acts" by s; s = 1.0 when normalisation is off.

`StreamPosition` is the bookkeeping every datamodule shares: the resume position, the rank and world
size of the attached trainer, `state_dict` / `load_state_dict`, and the train loader over a source.
`Batches` serves a validation set of ready batches held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

Batch = dict[str, Tensor]

# Rows used to estimate the normalisation scale where the training pool is not held in memory.
NORM_SAMPLE_ROWS = 65_536


def norm_scale(acts: Float[Tensor, "n d_in"], d_in: int | None = None) -> float:
    """s = sqrt(d_in / mean_n ‖x_n‖²), so that E‖s·x‖² = d_in over these rows."""
    d_in = int(acts.shape[1]) if d_in is None else int(d_in)
    ms = acts.double().pow(2).sum(1).mean()
    if not torch.isfinite(ms) or ms <= 0:
        raise ValueError(f"cannot normalise activations with mean squared norm {float(ms)}.")
    return float((d_in / ms).sqrt())


def scaled(batch: Batch, act_scale: float) -> Batch:
    """The batch with "acts" multiplied by `act_scale` (the same dict when the scale is 1)."""
    if act_scale == 1.0:
        return batch
    return {**batch, "acts": batch["acts"] * act_scale}


def epoch_permutation(n: int, seed: int, epoch: int) -> Int[Tensor, " n"]:
    """The row order of one epoch: a permutation of [0, n) seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def global_batch(step: int, rank: int = 0, world: int = 1, group: int = 1) -> int:
    """The global batch that rank `rank` of `world` reads at `step` (see the module docstring)."""
    block, j = divmod(step, group)
    return (block * world + rank) * group + j


class Shuffled:
    """Source over a table of rows: global batch g is rows perm_e[i·bs:(i+1)·bs] (e, i = divmod(g, nb)).

    Args:
        table: per-row columns, all of length n; "acts" is required.
        batch_size: rows per batch (nb = ⌊n / batch_size⌋ batches per epoch; one batch of all n rows
            when n < batch_size).
        seed: seeds every epoch's permutation.
    """

    _perm: Int[Tensor, " n"] | None  # the row order of epoch `_epoch` (None before the first batch)

    def __init__(self, table: Mapping[str, Tensor], batch_size: int, seed: int = 0) -> None:
        if "acts" not in table:
            raise ValueError(f"a training table needs an 'acts' column; it has {sorted(table)}.")
        self.table, self.batch_size, self.seed = dict(table), int(batch_size), int(seed)
        self.n = len(table["acts"])
        if self.n == 0:
            raise ValueError("the training table is empty: nothing to train on.")
        if any(len(v) != self.n for v in self.table.values()):
            raise ValueError("every column of a training table needs one entry per row.")
        self.batches_per_epoch = max(1, self.n // self.batch_size)
        self._epoch, self._perm = -1, None

    def __call__(self, g: int) -> Batch:
        epoch, i = divmod(g, self.batches_per_epoch)
        perm = self._perm
        if perm is None or epoch != self._epoch:  # one permutation per epoch, kept while the stream is in it
            perm = epoch_permutation(self.n, self.seed, epoch)
            self._epoch, self._perm = epoch, perm
        idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
        return {k: v[idx] for k, v in self.table.items()}


class Batches(Dataset[Batch]):
    """Ready batches held in memory (validation sets), for `DataLoader(Batches(batches), batch_size=None)`.

    A map-style dataset over the list: the loader yields batches[0], batches[1], ... in order, exactly
    as it would from the list itself.
    """

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.batches[i]


class BatchStream(IterableDataset):
    """Steps start, start+1, ... (to `stop`, or forever) of one rank: source(global_batch(step, ...)).

    Use with `DataLoader(stream, batch_size=None)` and no workers: the order is what makes resume exact.
    """

    def __init__(
        self,
        source: Callable[[int], Batch],
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        group: int = 1,
        act_scale: float = 1.0,
        stop: int | None = None,
    ) -> None:
        if world < 1 or not 0 <= rank < world or group < 1:
            raise ValueError(f"need 0 <= rank < world and group >= 1; got {rank}, {world}, {group}.")
        self.source, self.start, self.stop, self.act_scale = source, int(start), stop, float(act_scale)
        self.rank, self.world, self.group = int(rank), int(world), int(group)

    def __iter__(self) -> Iterator[Batch]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield scaled(self.source(global_batch(step, self.rank, self.world, self.group)), self.act_scale)
            step += 1


class _Scaled(IterableDataset):
    """A stream that splits by rank itself (`CacheDataset`), with "acts" scaled."""

    def __init__(self, stream: IterableDataset, act_scale: float) -> None:
        self.stream, self.act_scale = stream, float(act_scale)

    def __iter__(self) -> Iterator[Batch]:
        for b in self.stream:
            yield scaled(b, self.act_scale)


class StreamPosition:
    """Resume position, rank split and train loader for a `LightningDataModule` (list it first in the bases).

    A mixin, not a base class: each datamodule stays a plain LightningDataModule with its own typed
    constructor; this adds only what all four would otherwise repeat. The position is the trainer's
    `global_step` while one is attached (so it is in every checkpoint), else the one `load_state_dict` set.
    """

    position: int = 0

    def _start(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else int(self.position)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _train_loader(self, source: Callable[[int], Batch], act_scale: float, group: int = 1) -> DataLoader:
        """The training batches of this rank from the current position on."""
        self.position = self._start()
        rank, world = self._rank_world()
        stream = BatchStream(source, self.position, rank, world, group, act_scale)
        return DataLoader(stream, batch_size=None)

    def _split_loader(self, make: Callable[[int, int, int], IterableDataset], act_scale: float) -> DataLoader:
        """A loader over a stream that resumes and splits by rank on its own: make(start, rank, world)."""
        self.position = self._start()
        rank, world = self._rank_world()
        return DataLoader(_Scaled(make(self.position, rank, world), act_scale), batch_size=None)

    def state_dict(self) -> dict:
        return {"position": self._start()}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state.get("position", 0))
