"""Atomic writes leave files and directories with the modes the umask asks for, as open()/mkdir() would."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.checkpoint import AtomicCheckpointIO
from saelab.data.cache import build_cache
from saelab.files import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from saelab.io import save_sae
from saelab.sae import SAE, TopK


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_dirs_follow_the_umask(tmp_path, umask):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask  # umask 022: 0644 and 0755
    atomic_write_bytes(tmp_path / "plot.png", b"\x89PNG")
    atomic_write_text(tmp_path / "report.md", "# report\n")
    atomic_write_json(tmp_path / "results.json", {"metrics": {}})
    with atomic_dir(tmp_path / "sae") as tmp:
        (tmp / "cfg.json").write_text("{}\n")
    for name in ("plot.png", "report.md", "results.json", "sae/cfg.json"):
        assert mode(tmp_path / name) == file_mode, f"{name}: {oct(mode(tmp_path / name))}"
    assert mode(tmp_path / "sae") == dir_mode, oct(mode(tmp_path / "sae"))


def test_checkpoint_export_and_cache_follow_the_umask(tmp_path, umask):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, ckpt)
    assert mode(ckpt) == file_mode, oct(mode(ckpt))

    export = save_sae(SAE(8, 16, TopK(2), seed=0), tmp_path / "sae")
    assert mode(export) == dir_mode, oct(mode(export))
    for name in ("sae_weights.safetensors", "cfg.json"):
        assert mode(export / name) == file_mode, f"{name}: {oct(mode(export / name))}"

    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    chunks = lambda: iter([(x, torch.arange(64))])
    cache = build_cache(
        tmp_path / "cache", chunks, host_id="toy", hook="h", corpus_fingerprint="f", d_in=4, progress=False
    )
    modes = {p.name: mode(p) for p in cache.path.iterdir()}
    assert mode(cache.path) == dir_mode and set(modes.values()) == {file_mode}, (oct(mode(cache.path)), modes)
