"""Activation cache: sharded, checksummed, memory-mapped activations shared by every job of a sweep.

Harvesting activations from a host is the expensive step, so it runs once per *content key*:

    key = sha256(canonical JSON of {host_id, hook, corpus_fingerprint, d_in, dtype, max_tokens, extra})[:24]

i.e. everything that determines the activations (a changed corpus, layer, context length or dtype gives a
new key and never reuses a stale cache; the shard size only changes the layout and is not part of it).

Layout of one cache, `<root>/<key>/`:

    manifest.json                  host id, hook, corpus fingerprint, dtype, d_in, token count, key parts,
                                   and per shard: token count and, per file, bytes + sha256
    shard_00000.acts.npy           [n, d_in] float32 | float16   (n = tokens_per_shard, the last shard less)
    shard_00000.token_ids.npy      [n] int32                      (the token each activation row belongs to)
    shard_00000.<column>.npy       [n] int64                      (optional per-token columns, e.g. positions)

Building (`build_cache`) runs under a `filelock.FileLock` on `<root>/<key>.lock`: of several processes that
ask for the same key at once, one builds and the others wait, then open the finished cache. Shards are
written into a temporary sibling directory (each .npy via temp file + `os.replace`), the manifest last, and
the directory is renamed into place, so a killed build never leaves a cache that looks complete. A producer
is any iterable (or a zero-argument callable returning one, so a cache hit never runs the host) of chunks
`(acts [n, d_in], token_ids [n])` or `(acts, token_ids, {column: [n] ints})`, numpy or torch.

Reading (`ActivationCache.batches`) memory-maps each shard (`np.load(mmap_mode="r")`) and copies only the
rows of the current batch. Order: a seeded pseudo-random permutation of all token rows per epoch, computed
on the fly by a Feistel network with cycle-walking (a bijection on [0, n_tokens) with O(1) memory and
random access), so resuming from batch position p and splitting by rank need no stored state. Rank r of W
reads global batches r, r+W, r+2W, ... of each epoch (a partition). Resident memory stays flat as the cache
grows: no shard is ever loaded whole, and after each gather the file pages it faulted in are unmapped
again (madvise MADV_DONTNEED; the page cache keeps them), so the resident set is bounded by one batch
plus one shard's fault-around window, whatever the cache size.

Integrity: at open, every file must exist with the byte size in the manifest; the sha256 of a shard's
files is verified lazily, the first time this process reads from that shard (`verify="lazy"`, default), or
all at open (`verify="open"`), or never (`verify="none"`). A mismatch raises `CacheCorrupt` naming the
file and telling the user to delete the cache directory to rebuild it.

API: `cache_key(...)`, `build_cache(root, producer, host_id=..., hook=..., corpus_fingerprint=..., d_in=...)
-> ActivationCache`, `ActivationCache(path)` (`.batches(batch_size, seed, start, rank, world_size, epochs,
drop_last)`, `.num_batches(...)`, `.rows(idx)`, `.n_tokens`, `.d_in`, `.built`), `CacheDataset` (an
IterableDataset for `DataLoader(batch_size=None)`), `CacheCorrupt`, `FeistelPermutation`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from saelab.assets import CacheNotWritable, cache_lock, not_writable
from saelab.files import atomic_write_json, sha256_file, umask_mode

FORMAT = 1
MANIFEST = "manifest.json"
_DTYPES = {"float32": np.float32, "float16": np.float16}


class CacheCorrupt(RuntimeError):
    """A cache file is missing, truncated or fails its checksum; the message names it and the fix."""


# ------------------------------------------------------------------------------------------------- key


def cache_key(
    host_id: str,
    hook: str,
    corpus_fingerprint: str,
    d_in: int,
    dtype: str = "float32",
    max_tokens: int | None = None,
    extra: dict | None = None,
) -> str:
    """Content key: sha256 of everything that determines the cached activations (24 hex chars)."""
    parts = _key_parts(host_id, hook, corpus_fingerprint, d_in, dtype, max_tokens, extra)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _key_parts(host_id, hook, corpus_fingerprint, d_in, dtype, max_tokens, extra) -> dict:
    return {
        "format": FORMAT,
        "host_id": str(host_id),
        "hook": str(hook),
        "corpus_fingerprint": str(corpus_fingerprint),
        "d_in": int(d_in),
        "dtype": str(dtype),
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "extra": json.loads(json.dumps(extra or {}, sort_keys=True, default=str)),
    }


# ------------------------------------------------------------------------------------------- permutation


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A seeded bijection on [0, n) evaluated pointwise: balanced Feistel network + cycle-walking.

    The network permutes [0, 4^h) with 4^h >= n (6 rounds, round function splitmix64(right ^ key_i));
    cycle-walking re-applies it to values >= n, which yields a bijection on [0, n) (at most ~4 steps on
    average since 4^h < 4n). Memory is O(len(query)), independent of n.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("a permutation needs n >= 1.")
        self.n = int(n)
        self.half = max(1, (max(1, (self.n - 1).bit_length()) + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, 0x5AE1AB])
        self.keys = ss.generate_state(self.ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64)
        if x.size and (int(x.max()) >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n}).")
        if self.n == 1:
            return np.zeros(x.shape, dtype=np.int64)
        y = self._encrypt(x)
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():
            y[out_of_range] = self._encrypt(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


# ---------------------------------------------------------------------------------------------- writing


class _HashingWriter:
    """File-like object that forwards writes and accumulates sha256 + byte count."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        self.sha.update(mv)
        self.n += mv.nbytes
        return self.f.write(mv)


def _write_npy(path: Path, arr: np.ndarray) -> dict:
    """Write one .npy atomically (temp file + os.replace); return its name, byte size and sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            np.lib.format.write_array(w, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"name": path.name, "bytes": w.n, "sha256": w.sha.hexdigest()}


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


class _ShardWriter:
    """Accumulates chunks into fixed-size shards; memory is one shard's worth of rows."""

    def __init__(self, out: Path, d_in: int, dtype: str, tokens_per_shard: int) -> None:
        self.out, self.d_in, self.np_dtype, self.tps = out, d_in, _DTYPES[dtype], tokens_per_shard
        self.acts = np.empty((tokens_per_shard, d_in), dtype=self.np_dtype)
        self.tokens = np.empty(tokens_per_shard, dtype=np.int32)
        self.extras: dict[str, np.ndarray] | None = None
        self.fill = 0
        self.shards: list[dict] = []
        self.n_tokens = 0

    def add(self, acts: np.ndarray, token_ids: np.ndarray, extras: dict[str, np.ndarray]) -> None:
        if self.extras is None:
            self.extras = {k: np.empty(self.tps, dtype=np.int64) for k in sorted(extras)}
        elif sorted(extras) != sorted(self.extras):
            raise ValueError(f"every chunk must carry the same extra columns; got {sorted(extras)}.")
        start = 0
        while start < len(acts):
            take = min(self.tps - self.fill, len(acts) - start)
            sl = slice(self.fill, self.fill + take)
            self.acts[sl] = acts[start : start + take]
            self.tokens[sl] = token_ids[start : start + take]
            for k, v in extras.items():
                self.extras[k][sl] = v[start : start + take]
            self.fill += take
            start += take
            if self.fill == self.tps:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        i, n = len(self.shards), self.fill
        files = {
            "acts": _write_npy(self.out / f"shard_{i:05d}.acts.npy", self.acts[:n]),
            "token_ids": _write_npy(self.out / f"shard_{i:05d}.token_ids.npy", self.tokens[:n]),
        }
        for k, v in (self.extras or {}).items():
            files[k] = _write_npy(self.out / f"shard_{i:05d}.{k}.npy", v[:n])
        self.shards.append({"index": i, "n_tokens": n, "files": files})
        self.n_tokens += n
        self.fill = 0


def _chunks(producer, d_in: int, max_tokens: int | None) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Validate and normalise producer chunks; stop after max_tokens rows."""
    seen = 0
    for chunk in producer() if callable(producer) else producer:
        if not isinstance(chunk, (tuple, list)) or len(chunk) not in (2, 3):
            raise TypeError(
                "a producer yields (acts [n, d_in], token_ids [n]) or (acts, token_ids, {name: [n]})."
            )
        acts, ids = _as_numpy(chunk[0]), _as_numpy(chunk[1]).reshape(-1)
        extras = {k: _as_numpy(v).reshape(-1) for k, v in (chunk[2] if len(chunk) == 3 else {}).items()}
        if acts.ndim != 2 or acts.shape[1] != d_in:
            raise ValueError(
                f"producer chunk has activations of shape {tuple(acts.shape)}; expected [n, {d_in}]."
            )
        if len(ids) != len(acts) or any(len(v) != len(acts) for v in extras.values()):
            raise ValueError(
                "producer chunk: token_ids (and extra columns) need one entry per activation row."
            )
        if not np.isfinite(acts).all():
            raise ValueError("producer chunk holds NaN/inf activations; refusing to cache them.")
        if len(ids) and (ids.min() < 0 or ids.max() >= 2**31):
            raise ValueError("token ids must lie in [0, 2^31).")
        if max_tokens is not None and seen + len(acts) > max_tokens:
            keep = max_tokens - seen
            acts, ids, extras = acts[:keep], ids[:keep], {k: v[:keep] for k, v in extras.items()}
        seen += len(acts)
        yield acts, ids, extras
        if max_tokens is not None and seen >= max_tokens:
            return


def build_cache(
    root: str | Path,
    producer: Iterable | Callable[[], Iterable],
    *,
    host_id: str,
    hook: str,
    corpus_fingerprint: str,
    d_in: int,
    dtype: str = "float32",
    tokens_per_shard: int = 16384,
    max_tokens: int | None = None,
    extra: dict | None = None,
    verify: str = "lazy",
    lock_timeout: float = -1,
    progress: bool = True,
) -> ActivationCache:
    """Open the cache for this content key under `root`, building it from `producer` if absent.

    Concurrent callers with the same key: one builds (under the file lock), the rest wait and reuse; a
    waiting caller says who holds the lock, and after `lock_timeout` seconds (< 0: the default of
    `saelab.assets.cache_lock`) gives up with an error that names it.
    The returned cache has `.built == True` in the process that built it.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if tokens_per_shard < 1:
        raise ValueError("tokens_per_shard must be >= 1.")
    root = Path(root)
    parts = _key_parts(host_id, hook, corpus_fingerprint, d_in, dtype, max_tokens, extra)
    key = cache_key(host_id, hook, corpus_fingerprint, d_in, dtype, max_tokens, extra)
    final = root / key
    if (final / MANIFEST).exists():  # the manifest appears only with the renamed, complete directory
        return ActivationCache(final, verify=verify)  # (a read-only cache serves the caches it holds)
    with _writable(root):
        root.mkdir(parents=True, exist_ok=True)
    timeout = None if lock_timeout < 0 else lock_timeout
    with _writable(root), cache_lock(root / f"{key}.lock", f"the activation cache {final}", timeout):
        if (final / MANIFEST).exists():
            return ActivationCache(final, verify=verify)
        for stale in root.glob(f".{key}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        os.chmod(tmp, umask_mode(directory=True))  # shared caches: mkdtemp's 0700 would lock others out
        try:
            writer = _ShardWriter(tmp, d_in, dtype, tokens_per_shard)
            with _progress(progress, max_tokens, f"caching {hook} activations") as advance:
                for acts, ids, extras in _chunks(producer, d_in, max_tokens):
                    writer.add(acts, ids, extras)
                    advance(len(acts))
            writer.flush()
            if writer.n_tokens == 0:
                raise ValueError("the producer yielded no activations; nothing to cache.")
            manifest = {
                "format": FORMAT,
                "key": key,
                "key_parts": parts,
                "host_id": host_id,
                "hook": hook,
                "corpus_fingerprint": corpus_fingerprint,
                "dtype": dtype,
                "d_in": int(d_in),
                "n_tokens": writer.n_tokens,
                "tokens_per_shard": tokens_per_shard,
                "columns": {"acts": dtype, "token_ids": "int32", **{k: "int64" for k in writer.extras or {}}},
                "shards": writer.shards,
            }
            atomic_write_json(tmp / MANIFEST, manifest)
            if final.exists():  # a directory without a manifest: leftover of a failed rename
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno == errno.ENOSPC:
                raise OSError(
                    e.errno,
                    f"no space left on device while writing the activation cache under {root}; free "
                    "disk space or point the cache root elsewhere, then rerun.",
                ) from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    cache = ActivationCache(final, verify=verify)
    cache.built = True
    return cache


@contextlib.contextmanager
def _writable(root: Path) -> Iterator[None]:
    """Turn a permission error under the cache root `root` into one line that says what to do."""
    try:
        yield
    except OSError as e:
        if not_writable(e):
            raise CacheNotWritable(
                f"cannot write the activation cache under {root} ({e.strerror}): make it writable, point "
                "data.cache_dir (or SAELAB_CACHE) at a writable folder, or set data.cache=false to stream "
                "activations without caching them."
            ) from e
        raise


class _progress:
    """A rich progress bar over harvested tokens (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int | None, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self.p.__enter__()
        task = self.p.add_task(self.label, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.p.__exit__(*exc)


# ---------------------------------------------------------------------------------------------- reading


class ActivationCache:
    """A finished cache directory: integrity checks, random row access and batch streams."""

    def __init__(self, path: str | Path, verify: str = "lazy") -> None:
        if verify not in ("lazy", "open", "none"):
            raise ValueError(f"verify must be 'lazy', 'open' or 'none', got {verify!r}.")
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise CacheCorrupt(
                f"{mpath} is missing: {self.path} is not a complete cache; delete it to rebuild."
            )
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CacheCorrupt(f"{mpath} is not valid JSON ({e}); delete {self.path} to rebuild.") from e
        m = self.manifest
        self.key, self.d_in, self.dtype, self.n_tokens = (
            m["key"],
            int(m["d_in"]),
            m["dtype"],
            int(m["n_tokens"]),
        )
        self.columns = list(m["columns"])
        self.shard_sizes = np.array([s["n_tokens"] for s in m["shards"]], dtype=np.int64)
        self.offsets = np.concatenate(
            [[0], np.cumsum(self.shard_sizes)]
        )  # shard i holds rows [off_i, off_i+1)
        if int(self.offsets[-1]) != self.n_tokens:
            raise CacheCorrupt(
                f"{mpath}: shard sizes do not add up to n_tokens; delete {self.path} to rebuild."
            )
        self.verify = verify
        self.built = False
        self._verified: set[int] = set()
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        for shard in m["shards"]:  # cheap at open: every file present with its recorded size
            for info in shard["files"].values():
                f = self.path / info["name"]
                if not f.exists():
                    raise CacheCorrupt(
                        f"cache shard file {f} is missing. Delete {self.path} to rebuild the cache."
                    )
                if f.stat().st_size != info["bytes"]:
                    raise CacheCorrupt(
                        f"cache shard file {f} has {f.stat().st_size} bytes, the manifest says {info['bytes']} "
                        f"(truncated or overwritten). Delete {self.path} to rebuild the cache."
                    )
        if verify == "open":
            for i in range(len(self.shard_sizes)):
                self.verify_shard(i)

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        m = self.manifest
        return f"ActivationCache({self.path}, host={m['host_id']}, hook={m['hook']}, tokens={self.n_tokens}, d_in={self.d_in})"

    @property
    def n_shards(self) -> int:
        return len(self.shard_sizes)

    def verify_shard(self, i: int) -> None:
        """Check the sha256 of every file of shard i against the manifest (once per process)."""
        if i in self._verified:
            return
        for info in self.manifest["shards"][i]["files"].values():
            f = self.path / info["name"]
            got = sha256_file(f)
            if got != info["sha256"]:
                raise CacheCorrupt(
                    f"cache shard file {f} fails its checksum (sha256 {got[:12]}…, manifest {info['sha256'][:12]}…). "
                    f"The cache is corrupt: delete {self.path} to rebuild it."
                )
        self._verified.add(i)

    def _array(self, i: int, column: str) -> np.ndarray:
        arr = self._maps.get((i, column))
        if arr is not None:
            return arr
        if self.verify != "none":
            self.verify_shard(i)
        f = self.path / self.manifest["shards"][i]["files"][column]["name"]
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise CacheCorrupt(
                f"cache shard file {f} is unreadable ({e}). Delete {self.path} to rebuild it."
            ) from e
        n = int(self.shard_sizes[i])
        want = (n, self.d_in) if column == "acts" else (n,)
        if arr.shape != want:
            raise CacheCorrupt(
                f"cache shard file {f} has shape {arr.shape}, expected {want}. Delete {self.path} to rebuild."
            )
        self._maps[(i, column)] = arr
        return arr

    def rows(self, idx: np.ndarray, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Rows at global token indices `idx` (any order), copied out of the memory maps."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise IndexError(f"row index out of range [0, {self.n_tokens}).")
        cols = list(columns) if columns is not None else self.columns
        order = np.argsort(idx, kind="stable")  # grouped by shard, ascending inside it: sequential-ish reads
        sorted_idx = idx[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        out: dict[str, np.ndarray] = {}
        for c in cols:
            shape = (len(idx), self.d_in) if c == "acts" else (len(idx),)
            out[c] = np.empty(
                shape, dtype=_DTYPES[self.dtype] if c == "acts" else self.manifest["columns"][c]
            )
        for seg in np.split(np.arange(len(idx)), bounds):
            if seg.size == 0:
                continue
            s = int(shard_of[seg[0]])
            local = sorted_idx[seg] - self.offsets[s]
            for c in cols:
                arr = self._array(s, c)
                out[c][order[seg]] = arr[local]
                self._forget_pages(s, c, arr)
        return out

    def _forget_pages(self, i: int, column: str, arr: np.ndarray) -> None:
        """Unmap the file pages a gather faulted in, so they leave this process's resident set.

        The kernel maps whole fault-around windows (64 KiB) of cached pages per touched row, so after a
        random gather most of a shard would otherwise stay resident. MADV_DONTNEED on a read-only file
        mapping only drops the page-table entries (the page cache keeps the data). Where madvise is
        unavailable, the map is closed instead and reopened on next use.
        """
        mm = arr.base if isinstance(arr.base, mmap.mmap) else getattr(arr, "_mmap", None)
        if mm is None:  # not backed by a map we can reach
            self._maps.pop((i, column), None)
            return
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):
            self._maps.pop((i, column), None)

    def num_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
    ) -> int:
        """Batches per epoch that rank `rank` of `world_size` reads.

        drop_last=True: every rank reads the same number, floor(n_tokens / batch_size) // world_size full
        batches (what DDP needs; the dropped rows differ every epoch since the permutation does).
        drop_last=False: every row once per epoch; global batch g goes to rank g % world_size.
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}."
            )
        if drop_last:
            return (self.n_tokens // batch_size) // world_size
        g = -(-self.n_tokens // batch_size)
        return len(range(rank, g, world_size))

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = 1,
        drop_last: bool = False,
        shuffle: bool = True,
        columns: Iterable[str] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {"acts": float32 [batch, d_in], "token_ids": long [batch], ...} batches.

        The stream of this rank is a pure function of (seed, rank, world_size, batch_size, drop_last): batch
        number p (counted across epochs, from 0) is read from rows perm_epoch(positions of global batch
        (p mod nb)·W + r), with perm_epoch a FeistelPermutation seeded by (seed, epoch). `start=p` resumes at
        batch p: the result is exactly the tail of the uninterrupted stream. epochs=None streams forever.
        """
        nb = self.num_batches(batch_size, rank, world_size, drop_last)
        if nb == 0:
            raise ValueError(
                f"cache {self.path} has {self.n_tokens} tokens: too few for one batch of {batch_size} per rank "
                f"on {world_size} ranks. Cache more tokens or lower the batch size."
            )
        cols = list(columns) if columns is not None else self.columns
        p = int(start)
        perm_epoch, perm = -1, None
        while epochs is None or p < epochs * nb:
            epoch, j = divmod(p, nb)
            if epoch != perm_epoch:
                perm = FeistelPermutation(self.n_tokens, seed * 1_000_003 + epoch) if shuffle else None
                perm_epoch = epoch
            g = j * world_size + rank
            pos = np.arange(g * batch_size, min((g + 1) * batch_size, self.n_tokens), dtype=np.int64)
            rows = self.rows(perm(pos) if perm is not None else pos, cols)
            batch = {c: torch.from_numpy(v.astype(np.int64)) for c, v in rows.items() if c != "acts"}
            if "acts" in rows:
                batch["acts"] = torch.from_numpy(rows["acts"].astype(np.float32, copy=False))
            yield batch
            p += 1


class CacheDataset(IterableDataset):
    """`ActivationCache.batches` as an IterableDataset; use with `DataLoader(ds, batch_size=None)`.

    Holds only the path (picklable); the cache is opened in the iterating process. Use num_workers=0:
    a batch is a few memory-map copies, and the stream order is what makes resumption exact.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        drop_last: bool = True,
        verify: str = "lazy",
        columns: Iterable[str] | None = None,
    ) -> None:
        self.path, self.batch_size, self.seed, self.start = Path(path), batch_size, seed, start
        self.columns = None if columns is None else list(columns)
        self.rank, self.world_size, self.epochs, self.drop_last, self.verify = (
            rank,
            world_size,
            epochs,
            drop_last,
            verify,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                "CacheDataset yields one ordered stream; with num_workers > 1 every worker would repeat it. "
                "Use DataLoader(..., batch_size=None, num_workers=0 or 1)."
            )
        cache = ActivationCache(self.path, verify=self.verify)
        yield from cache.batches(
            self.batch_size,
            self.seed,
            self.start,
            self.rank,
            self.world_size,
            self.epochs,
            self.drop_last,
            columns=self.columns,
        )
