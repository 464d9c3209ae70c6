"""The shared training stream: rank split, resume, per-epoch coverage, normalisation, the datamodule mixin."""

from __future__ import annotations

from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support import save_tiny_causal_lm

from saelab.data.stream import BatchStream, Shuffled, global_batch, norm_scale
from saelab.data.synthetic import SyntheticDataModule
from saelab.data.text import Contexts, _Live

N, BS = 103, 10  # 10 batches per epoch, 3 rows left over


def _table(n: int = N) -> dict:
    return {"acts": torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), "row": torch.arange(n)}


def _rows(stream, steps: int) -> list[list[int]]:
    it = iter(stream)
    return [next(it)["row"].tolist() for _ in range(steps)]


@pytest.mark.parametrize("world,group", [(1, 1), (2, 1), (3, 1), (2, 3)])
def test_global_batches_partition_the_steps(world, group):
    got = sorted(global_batch(s, r, world, group) for r in range(world) for s in range(6 * group))
    assert got == list(range(6 * group * world))
    assert [global_batch(s, 0, 1, group) for s in range(7)] == list(range(7))  # one rank: g = step


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_batches_that_cover_each_epoch(world):
    src = Shuffled(_table(), BS, seed=4)
    steps = 2 * src.batches_per_epoch  # two epochs, more than enough for every rank
    seen = {r: _rows(BatchStream(src, 0, r, world), steps) for r in range(world)}
    by_epoch: dict[int, list[int]] = {}
    for r, batches in seen.items():
        for s, rows in enumerate(batches):
            assert len(rows) == BS
            by_epoch.setdefault(global_batch(s, r, world) // src.batches_per_epoch, []).extend(rows)
    first = by_epoch[0]  # epoch 0 is read completely: every row at most once, all but the 3 left over
    assert len(first) == len(set(first)) == BS * src.batches_per_epoch
    assert all(len(rows) == len(set(rows)) for rows in by_epoch.values())


def test_epochs_are_fresh_permutations():
    src = Shuffled(_table(), BS, seed=4)
    rows = _rows(BatchStream(src), 3 * src.batches_per_epoch)
    epochs = [sum(rows[e * 10 : (e + 1) * 10], []) for e in range(3)]
    for e in epochs:
        assert len(set(e)) == 100
    assert epochs[0] != epochs[1] and set(epochs[0]) != set(epochs[1])  # other order, other left-overs
    assert _rows(BatchStream(Shuffled(_table(), BS, seed=4)), 30) == rows  # a pure function of the seed
    assert _rows(BatchStream(Shuffled(_table(), BS, seed=5)), 1) != rows[:1]


@pytest.mark.parametrize("world,group", [(1, 1), (2, 1), (2, 3)])
def test_resumed_stream_is_the_tail_of_the_uninterrupted_one(world, group):
    for r in range(world):
        full = _rows(BatchStream(Shuffled(_table(), BS, 4), 0, r, world, group), 25)
        for p in (1, 7, 11):
            # a fresh source, as after a restart
            assert _rows(BatchStream(Shuffled(_table(), BS, 4), p, r, world, group), 25 - p) == full[p:]


def test_act_scale_normalises_the_mean_squared_norm():
    x = (
        torch.randn(500, 12, generator=torch.Generator().manual_seed(1))
        * torch.linspace(0.1, 7.0, 500)[:, None]
    )
    s = norm_scale(x)
    sq = (x.numpy().astype(np.float64) * s) ** 2
    assert sq.sum(1).mean() == pytest.approx(12.0, rel=1e-9)
    assert norm_scale(x, 3) == pytest.approx(s / 2)
    # the stream scales "acts" and leaves the other columns alone
    t = _table()
    b = next(iter(BatchStream(Shuffled(t, BS, 0), act_scale=2.5)))
    assert torch.equal(b["acts"], t["acts"][b["row"]] * 2.5)
    assert b["row"].dtype == torch.long


def test_datamodule_mixin_reads_rank_world_and_position():
    dm = SyntheticDataModule(d_in=8, n_features=32, batch_size=16, n_parents=2, children_per_parent=2)
    assert dm.act_scale == 1.0
    first = next(iter(dm.train_dataloader()))["acts"]
    assert torch.equal(first, dm.features.sample(16, 0)[0])
    dm.load_state_dict({"position": 5})
    assert torch.equal(next(iter(dm.train_dataloader()))["acts"], dm.features.sample(16, 5)[0])
    assert dm.state_dict() == {"position": 5}
    dm.trainer = SimpleNamespace(global_step=3, global_rank=1, world_size=2)  # what Lightning attaches
    assert torch.equal(next(iter(dm.train_dataloader()))["acts"], dm.features.sample(16, 3 * 2 + 1)[0])
    assert dm.state_dict() == {"position": 3}


def test_synthetic_normalize():
    dm = SyntheticDataModule(
        d_in=8, n_features=32, batch_size=256, n_parents=2, children_per_parent=2, normalize=True
    )
    x = torch.cat([dm.features.sample(256, g)[0] for g in range(256)]).double()  # the first 65536 rows
    assert (x * dm.act_scale).pow(2).sum(1).mean().item() == pytest.approx(8.0, rel=1e-9)
    assert torch.equal(
        next(iter(dm.train_dataloader()))["acts"], dm.features.sample(256, 0)[0] * dm.act_scale
    )
    assert torch.equal(next(iter(dm.val_dataloader()))["acts"], dm.features.sample(256, -4)[0] * dm.act_scale)


class _IdHost:
    """A stand-in causal LM whose activation at a position is its (unique) token id."""

    def activations(self, input_ids, attention_mask):
        return input_ids[..., None].float().expand(*input_ids.shape, 2)


def test_live_text_windows_are_split_by_rank_and_cover_each_epoch():
    n_ctx, seq = 12, 8  # 12 contexts × 7 SAE positions (position 0 is BOS) = 84 rows
    ids = torch.arange(n_ctx * seq).view(n_ctx, seq)
    mask = torch.ones(n_ctx, seq, dtype=torch.bool)
    mask[:, 0] = False
    ctx = Contexts(ids, mask.long(), mask)
    live = _Live(_IdHost(), ctx, batch_size=8, harvest_batch=4, seed=2)
    assert live.m == 3 and live.n_windows == 3  # windows of 3 batches (24 rows), 9 batches per epoch
    sae_ids = set(ids[mask].tolist())
    steps = 6  # two windows per rank: epoch 0 is read completely by rank 0 and rank 1 together
    seen = []
    for r in range(2):
        stream = BatchStream(_Live(_IdHost(), ctx, 8, 4, 2), 0, r, 2, group=live.m)
        it = iter(stream)
        batches = [next(it) for _ in range(steps)]
        for b in batches:
            assert torch.equal(b["acts"][:, 0].long(), b["token_ids"])  # acts paired with their tokens
        seen.append([t for b in batches for t in b["token_ids"].tolist()])
        # resume at any step gives the same tail (a fresh source, as after a restart)
        tail = iter(BatchStream(_Live(_IdHost(), ctx, 8, 4, 2), 4, r, 2, group=live.m))
        assert [next(tail)["token_ids"].tolist() for _ in range(2)] == [
            b["token_ids"].tolist() for b in batches[4:]
        ]
    # rank 0 reads global windows 0 and 2, rank 1 windows 1 and 3; windows 0..2 are epoch 0 (72 of 84 rows)
    epoch0 = seen[0][:24] + seen[1][:24] + seen[0][24:]
    assert len(epoch0) == len(set(epoch0)) == 72 and set(epoch0) <= sae_ids
    assert len(set(seen[1][24:])) == 24 and set(seen[1][24:]) <= sae_ids  # epoch 1 begins


TEXTS = [
    "The electron is a subatomic particle with a negative electric charge.",
    "Stars fuse hydrogen into helium in their cores, releasing energy as light.",
    "She planted tomatoes and basil in the garden behind the old farmhouse.",
] * 8


@pytest.mark.parametrize("cache", [True, False])
def test_text_normalize_scales_train_and_val(tmp_path, cache):
    from saelab.data.text import TextActivations
    from saelab.hosts.causal_lm import CausalLMHost

    path = save_tiny_causal_lm(tmp_path / "llama", "llama", n_layers=2, hidden=32)

    def make(normalize: bool) -> TextActivations:
        host = CausalLMHost(str(path), hook=1, d_in=32)
        return TextActivations(
            host, TEXTS, TEXTS[::-1], context_len=16, train_tokens=300, val_tokens=60, batch_size=32,
            harvest_batch=4, cache=cache, cache_dir=str(tmp_path / "cache"), seed=1, normalize=normalize,
        )  # fmt: skip

    dm, raw = make(True), make(False)
    assert raw.act_scale == 1.0
    # the training pool (300 rows) is smaller than the estimation sample, so s is exact over it
    x = torch.from_numpy(dm.store("train").rows(np.arange(300))["acts"]).double()
    assert (x * dm.act_scale).pow(2).sum(1).mean().item() == pytest.approx(32.0, rel=1e-4)
    for a, b in zip(islice(dm.train_dataloader(), 3), islice(raw.train_dataloader(), 3)):
        torch.testing.assert_close(a["acts"], b["acts"] * dm.act_scale)
        assert torch.equal(a["token_ids"], b["token_ids"])
    v, w = next(iter(dm.val_dataloader())), next(iter(raw.val_dataloader()))
    torch.testing.assert_close(v["acts"], w["acts"] * dm.act_scale)
