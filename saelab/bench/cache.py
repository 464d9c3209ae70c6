"""Benchmark section `cache`: peak resident memory of building and reading activation caches as they grow.

For each size (64 MB, 256 MB, 1 GB; `--quick`: 16 MB, 64 MB) a synthetic producer writes a cache of
d_in = 576 float32 rows (the SmolLM2-135M residual width) into a temporary directory, in a child process;
a second, fresh child process reads one full shuffled epoch through `ActivationCache.batches` (batch 4096,
lazy sha256 verification of every shard included). Each child reports its peak resident set (VmHWM from
/proc/self/status, which counts file pages mapped by the memory maps as well as heap) minus its own VmHWM
just before the work started. A flat read column across sizes is the property under test: the reader never
loads a shard whole and unmaps the pages each gather faulted in (MADV_DONTNEED).

Run: `python -m saelab.bench --sections cache [--quick] [--steps N]` (N caps the batches read per cache).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D_IN = 576
BATCH = 4096
MB = 1 << 20


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmHWM = peak resident set, VmRSS = current)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (needs Linux).")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); harmless if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _producer(n_tokens: int, chunk: int = 8192):
    rng = np.random.default_rng(0)
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        yield rng.random((n, D_IN), dtype=np.float32), rng.integers(0, 49152, n)


def _child_build(root: str, size_mb: int) -> dict:
    from saelab.data.cache import build_cache

    n_tokens = size_mb * MB // (D_IN * 4)
    _reset_peak()
    base = _status_kb("VmHWM")
    t0 = time.perf_counter()
    cache = build_cache(
        root,
        lambda: _producer(n_tokens),
        host_id="bench",
        hook="synthetic",
        corpus_fingerprint=f"bench-{size_mb}",
        d_in=D_IN,
        progress=False,
    )
    return {
        "path": str(cache.path),
        "n_tokens": cache.n_tokens,
        "n_shards": cache.n_shards,
        "seconds": time.perf_counter() - t0,
        "peak_mb": (_status_kb("VmHWM") - base) / 1024,
    }


def _child_read(path: str, max_batches: int | None) -> dict:
    from saelab.data.cache import ActivationCache

    cache = ActivationCache(path)
    _reset_peak()
    base = _status_kb("VmHWM")
    t0 = time.perf_counter()
    rows = 0
    for i, b in enumerate(cache.batches(BATCH, seed=0)):
        rows += len(b["acts"])
        if max_batches is not None and i + 1 >= max_batches:
            break
    return {"rows": rows, "seconds": time.perf_counter() - t0, "peak_mb": (_status_kb("VmHWM") - base) / 1024}


def _run_child(*argv: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "saelab.bench.cache", *argv], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"bench child {' '.join(argv)} failed:\n{r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> list[str]:
    """Build caches of growing size and read each through once; the lines of a table."""
    sizes = [16, 64] if getattr(args, "quick", False) else [64, 256, 1024]
    steps = getattr(args, "steps", None)
    tmp = Path(tempfile.mkdtemp(prefix="saelab-bench-cache-"))
    lines = [
        f"activation cache, d_in={D_IN} float32, batch {BATCH}, one shuffled epoch per cache "
        "(peak RSS = VmHWM growth of a fresh process)",
        f"{'cache':>8} {'tokens':>9} {'shards':>6} {'build s':>8} {'build peak MB':>13} "
        f"{'read s':>7} {'Mtok/s':>7} {'read peak MB':>12}",
    ]
    try:
        free_mb = shutil.disk_usage(tmp).free // MB
        for size in sizes:
            if free_mb < 2 * size + 512:
                lines.append(f"{size:>6}MB skipped: {free_mb} MB free in {tmp.parent}")
                continue
            built = _run_child("--build", str(tmp), str(size))
            read = _run_child("--read", built["path"], str(steps or 0))
            lines.append(
                f"{size:>6}MB {built['n_tokens']:>9} {built['n_shards']:>6} {built['seconds']:>8.1f} "
                f"{built['peak_mb']:>13.1f} {read['seconds']:>7.1f} {read['rows'] / read['seconds'] / 1e6:>7.2f} "
                f"{read['peak_mb']:>12.1f}"
            )
            shutil.rmtree(built["path"], ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines.append(
        "read peak stays flat as the cache grows (pages each gather maps are unmapped again); build peak is one shard buffer."
    )
    return lines


if __name__ == "__main__":  # child roles, so each measurement starts from a fresh process
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", nargs=2, metavar=("ROOT", "SIZE_MB"))
    ap.add_argument("--read", nargs=2, metavar=("PATH", "MAX_BATCHES"))
    a = ap.parse_args()
    if a.build:
        out = _child_build(a.build[0], int(a.build[1]))
    else:
        out = _child_read(a.read[0], int(a.read[1]) or None)
    print(json.dumps(out))
