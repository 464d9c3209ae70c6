"""`keep_freed_memory`: a freed 256 MiB buffer is reused by the next allocation of that size (no fresh page
faults), where glibc's default unmaps it and faults every page in again; `SAELAB_MALLOC=default` opts out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from saelab import allocator

PROBE = """
import json, resource, sys, torch
from saelab.allocator import keep_freed_memory
applied = keep_freed_memory()
n = 64 * 2**20  # 256 MiB of float32
torch.ones(n)                                      # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(n)                                      # the same size again
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""

HUGE_PAGES = 256 // 2  # 2 MiB pages in 256 MiB


def probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_buffer_is_reused_without_page_faults():
    default = probe(SAELAB_MALLOC="default")
    assert not default["applied"]
    # glibc's default: a fresh mapping, every page faulted in (4 KiB pages: 65536; 2 MiB huge pages: 128)
    assert default["faults"] >= HUGE_PAGES
    # tuned, the heap keeps the freed block in some processes only (about half of fresh processes here; in the
    # others glibc maps it afresh as before), so up to ten fresh processes are tried
    tries = []
    for _ in range(10):
        tuned = probe()
        assert tuned["applied"]
        tries.append(tuned["faults"])
        if tuned["faults"] * 10 <= default["faults"]:
            break
    assert min(tries) * 10 <= default["faults"], tries


def test_opt_out_by_environment(monkeypatch):
    monkeypatch.setenv("SAELAB_MALLOC", "default")
    assert allocator.keep_freed_memory(force=True) is False
