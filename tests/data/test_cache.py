"""Activation cache: round trip, integrity, resumption, rank split, concurrent builds, content keys."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.data.cache import (
    ActivationCache,
    CacheCorrupt,
    CacheDataset,
    FeistelPermutation,
    build_cache,
    cache_key,
)

N, D = 1000, 8


def _data(n: int = N, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), np.arange(n)  # token id = row number


def _producer(x: np.ndarray, ids: np.ndarray, chunk: int = 77, log: Path | None = None, delay: float = 0.0):
    def gen():
        if log is not None:
            with open(log, "a") as f:
                f.write("build\n")
        for i in range(0, len(x), chunk):
            if delay:
                time.sleep(delay)
            yield x[i : i + chunk], torch.as_tensor(ids[i : i + chunk])

    return gen


def _build(root, x, ids, **kw):
    args = dict(host_id="toy", hook="layers.3", corpus_fingerprint="abc", d_in=x.shape[1], progress=False)
    args.update(kw)
    return build_cache(root, _producer(x, ids), tokens_per_shard=args.pop("tokens_per_shard", 128), **args)


def test_permutation_is_a_bijection_and_seeded():
    for n in (1, 2, 3, 5, 64, 1000, 4099):
        for seed in (0, 1):
            p = FeistelPermutation(n, seed)(np.arange(n))
            assert np.array_equal(np.sort(p), np.arange(n))
    a, b = FeistelPermutation(1000, 0)(np.arange(1000)), FeistelPermutation(1000, 1)(np.arange(1000))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    # well mixed: position and index are uncorrelated, and a short prefix spreads over the whole range
    p = FeistelPermutation(4099, 0)(np.arange(4099))
    assert abs(np.corrcoef(np.arange(4099), p)[0, 1]) < 0.05
    assert len(np.unique(p[:256] * 8 // 4099)) == 8
    # pointwise evaluation agrees with the full permutation (random access for resume)
    assert np.array_equal(FeistelPermutation(1000, 0)(np.array([17, 3, 999])), a[[17, 3, 999]])


def test_round_trip_every_row_exactly_once(tmp_path):
    x, ids = _data()
    cache = _build(tmp_path, x, ids)
    assert cache.built and cache.n_tokens == N and cache.n_shards == 8  # 7 × 128 + 104
    m = json.loads((cache.path / "manifest.json").read_text())
    assert (
        m["d_in"] == D and m["n_tokens"] == N and m["hook"] == "layers.3" and m["corpus_fingerprint"] == "abc"
    )
    for s in m["shards"]:  # checksums in the manifest are those of the files on disk
        for info in s["files"].values():
            assert hashlib.sha256((cache.path / info["name"]).read_bytes()).hexdigest() == info["sha256"]
    got_ids, got_x = [], []
    for b in cache.batches(64, seed=3):
        assert b["acts"].dtype == torch.float32 and b["token_ids"].dtype == torch.long
        got_ids.append(b["token_ids"])
        got_x.append(b["acts"])
    tid, acts = torch.cat(got_ids).numpy(), torch.cat(got_x).numpy()
    assert np.array_equal(np.sort(tid), ids)  # every row exactly once
    assert not np.array_equal(tid, ids)  # and shuffled
    assert np.array_equal(acts, x[tid])  # bit-exact rows, paired with their token ids
    assert cache.num_batches(64) == 16


def test_float16_and_extra_columns(tmp_path):
    x, ids = _data(300)
    pos = np.arange(300) % 17

    def prod():
        for i in range(0, 300, 50):
            yield x[i : i + 50], ids[i : i + 50], {"position": pos[i : i + 50]}

    cache = build_cache(
        tmp_path, prod, host_id="t", hook="h", corpus_fingerprint="c", d_in=D, dtype="float16", progress=False
    )
    b = next(cache.batches(300))
    t = b["token_ids"].numpy()
    assert np.array_equal(b["position"].numpy(), pos[t])
    assert np.array_equal(b["acts"].numpy(), x[t].astype(np.float16).astype(np.float32))


def test_reuse_and_content_key(tmp_path):
    x, ids = _data()
    first = _build(tmp_path, x, ids)
    again = _build(tmp_path, x, ids, tokens_per_shard=999)  # layout is not content: same cache, no rebuild
    assert not again.built and again.path == first.path
    other_hook = _build(tmp_path, x, ids, hook="layers.4")
    other_corpus = _build(tmp_path, x, ids, corpus_fingerprint="abd")
    assert len({first.path, other_hook.path, other_corpus.path}) == 3
    assert cache_key("toy", "layers.3", "abc", D) == first.key
    assert cache_key("toy", "layers.3", "abc", D, extra={"ctx": 128}) != first.key


def test_bitflip_is_detected_and_named(tmp_path):
    x, ids = _data()
    cache = _build(tmp_path, x, ids)
    victim = cache.path / "shard_00005.acts.npy"
    raw = bytearray(victim.read_bytes())
    raw[-13] ^= 0xFF
    victim.write_bytes(bytes(raw))
    reopened = ActivationCache(cache.path)  # sizes still match: detected lazily, on first read of that shard
    with pytest.raises(CacheCorrupt, match=r"shard_00005\.acts\.npy.*delete .* to rebuild"):
        for _ in reopened.batches(64):
            pass
    with pytest.raises(CacheCorrupt, match="shard_00005"):
        ActivationCache(cache.path, verify="open")
    # a reader that never touches the damaged shard is not stopped
    ok = ActivationCache(cache.path)
    assert len(ok.rows(np.arange(10))["acts"]) == 10


def test_truncated_or_missing_shard_fails_at_open(tmp_path):
    x, ids = _data()
    cache = _build(tmp_path, x, ids)
    victim = cache.path / "shard_00002.token_ids.npy"
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(CacheCorrupt, match=r"shard_00002\.token_ids\.npy.*bytes"):
        ActivationCache(cache.path)
    victim.unlink()
    with pytest.raises(CacheCorrupt, match="missing"):
        ActivationCache(cache.path)


def test_resume_gives_exact_tail(tmp_path):
    x, ids = _data()
    cache = _build(tmp_path, x, ids)
    full = [b["token_ids"] for b in cache.batches(96, seed=1, epochs=3, drop_last=True)]
    assert len(full) == 3 * (N // 96)
    for p in (0, 4, 10, 11, 25):  # 10 batches per epoch: 10, 11 and 25 cross epoch boundaries
        tail = [b["token_ids"] for b in cache.batches(96, seed=1, epochs=3, drop_last=True, start=p)]
        assert len(tail) == len(full) - p
        assert all(torch.equal(a, b) for a, b in zip(tail, full[p:], strict=True))
    # epochs differ in order
    assert not torch.equal(full[0], full[10])


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_the_data(tmp_path, world):
    x, ids = _data()
    cache = _build(tmp_path, x, ids)
    per_rank = [
        torch.cat([b["token_ids"] for b in cache.batches(64, seed=2, rank=r, world_size=world)])
        for r in range(world)
    ]
    allr = torch.cat(per_rank).numpy()
    assert np.array_equal(np.sort(allr), ids)  # disjoint and complete
    # drop_last: equal numbers of full batches on every rank (what DDP needs), still disjoint
    counts = [
        len(list(cache.batches(64, seed=2, rank=r, world_size=world, drop_last=True))) for r in range(world)
    ]
    assert counts == [(N // 64) // world] * world
    seen = np.concatenate(
        [
            torch.cat(
                [b["token_ids"] for b in cache.batches(64, rank=r, world_size=world, drop_last=True)]
            ).numpy()
            for r in range(world)
        ]
    )
    assert len(np.unique(seen)) == len(seen) == world * counts[0] * 64


def test_dataset_streams_one_epoch(tmp_path):
    x, ids = _data()
    cache = _build(tmp_path, x, ids)
    loader = torch.utils.data.DataLoader(
        CacheDataset(cache.path, 100, epochs=1, drop_last=False), batch_size=None
    )
    assert sum(len(b["acts"]) for b in loader) == N


def _rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    pytest.skip("needs Linux /proc/self/status")


def test_mapped_pages_do_not_pile_up(tmp_path):
    # 32 MB cache in 8 MB shards; a shuffled epoch touches every page of every shard
    x, ids = _data(16384, 512)
    cache = _build(tmp_path, x, ids, tokens_per_shard=4096)
    reader = ActivationCache(cache.path, verify="open")
    base, peak = _rss_file_mb(), 0.0
    for _ in reader.batches(1024):
        peak = max(peak, _rss_file_mb() - base)
    assert peak < 12, (
        f"file pages mapped by the reader grew by {peak:.1f} MB"
    )  # < one shard + slack, not 32 MB


def test_failed_build_leaves_nothing(tmp_path):
    x, ids = _data()

    def broken():
        yield x[:100], ids[:100]
        raise RuntimeError("host crashed")

    with pytest.raises(RuntimeError, match="host crashed"):
        build_cache(tmp_path, broken, host_id="t", hook="h", corpus_fingerprint="c", d_in=D, progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(ValueError, match="expected \\[n, 8\\]"):
        build_cache(
            tmp_path, [(x[:, :4], ids)], host_id="t", hook="h", corpus_fingerprint="c", d_in=D, progress=False
        )
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_cache(
            tmp_path, [(bad, ids)], host_id="t", hook="h", corpus_fingerprint="c", d_in=D, progress=False
        )


def test_full_disk_says_what_to_do(tmp_path, monkeypatch):
    import errno

    import saelab.data.cache as cache_mod

    x, ids = _data()
    calls = []

    def full(path, arr):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, arr)

    real = cache_mod._write_npy
    monkeypatch.setattr(cache_mod, "_write_npy", full)
    with pytest.raises(OSError, match="no space left on device.*free disk space"):
        _build(tmp_path, x, ids)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # no half-written cache


def _worker(root: str, log: str, barrier, queue) -> None:
    x, ids = _data()
    barrier.wait()
    cache = build_cache(
        root,
        _producer(x, ids, log=Path(log), delay=0.02),
        host_id="toy",
        hook="layers.3",
        corpus_fingerprint="abc",
        d_in=D,
        tokens_per_shard=128,
        progress=False,
    )
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.path.iterdir())}
    queue.put((cache.built, str(cache.path), digest))


def test_two_processes_build_once(tmp_path):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    log = tmp_path / "builds.log"
    procs = [
        ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(log), barrier, queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert log.read_text().count("build") == 1  # the producer (the host) ran once
    assert sorted(r[0] for r in results) == [False, True]  # one built, the other waited and reused
    assert results[0][1] == results[1][1] and results[0][2] == results[1][2]  # identical files
    x, ids = _data()
    rows = ActivationCache(results[0][1], verify="open").rows(np.arange(N))
    assert np.array_equal(rows["acts"], x) and np.array_equal(rows["token_ids"], ids)
