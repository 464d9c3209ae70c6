"""Keep freed CPU memory in the process for reuse instead of handing it back to the kernel each step (glibc).

glibc serves each allocation above its mmap threshold (128 KiB, raised dynamically to at most 32 MiB) with a
fresh `mmap` and unmaps it on free, and trims the heap top above 128 KiB. A CPU training step of a large SAE
allocates and frees buffers far above that (batch 4096 × d_sae 16384 pre-activations are 256 MiB), so every
step faults in and zeroes its working set anew: on 2 cores that was about a third of the step (compare
`python -m saelab.bench --sections variants` with `SAELAB_MALLOC=default` in front). Raising both thresholds to 2 GiB lets the
heap keep and reuse those blocks; the cost is that the resident size stays at its peak until the process ends.
It does not always take: in about half of fresh processes here glibc still maps such a block afresh (not
understood yet; `tests/test_allocator.py` measures it), and then the step is as slow as before.

`keep_freed_memory()` is called once by the CLI and the benchmark; `SAELAB_MALLOC=default` leaves glibc's
behaviour alone. Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
LIMIT = 2**31 - 1  # mallopt takes an int

_applied: bool | None = None


def keep_freed_memory(force: bool = False) -> bool:
    """Raise glibc's mmap and trim thresholds to 2 GiB; True where that took effect (once per process)."""
    global _applied
    if _applied is not None and not force:
        return _applied
    _applied = False
    if os.environ.get("SAELAB_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, LIMIT))
    return _applied
