"""Nothing saelab reads back from a run directory or a cache unpickles code.

Each test plants a pickle whose payload would create a marker file (a crafted file would call os.system the
same way) where saelab reads: the host cache and best host checkpoint of `host_stage`, a Lightning checkpoint
given to `resume=auto` or `resume=<path>`, an activation-cache shard, an embedding-cache part. The marker
must never appear, and the user gets one line naming the file and what to do. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
is set throughout: it turns torch's safe default off wherever a caller leaves `weights_only` unset.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import support
import torch
from conftest import compose_cfg
from support import run_cli
from torch import nn
from torch.utils.data import TensorDataset

from saelab.data.cache import CacheCorrupt, build_cache
from saelab.files import RefusedFile, load_torch
from saelab.hosts.embedder import SentenceEmbedder
from saelab.stage import host_stage
from saelab.train import fit

SMALL = ["data.d_in=32", "data.n_features=128", "data.batch_size=256", "sae.d_sae=128", "sae.activation.k=4"]


class Payload:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(autouse=True)
def unsafe_torch_default(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "payload-ran"


def plant(path: Path, marker: Path, **fields) -> Path:
    """A torch file shaped like a checkpoint, with the payload beside its state dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, **fields, "payload": Payload(marker)}, path)
    return path


def refused(err: pytest.ExceptionInfo, path: Path, remedy: str) -> None:
    text = str(err.value)
    assert text.startswith(f"{path} holds pickled Python objects besides tensors"), text
    assert remedy in text and "\n" not in text


def test_load_torch_refuses_payloads_and_names_damaged_files(tmp_path, marker):
    f = plant(tmp_path / "x.pt", marker)
    with pytest.raises(RefusedFile) as err:
        load_torch(f, "Delete it.")
    refused(err, f, "Delete it.")
    f.write_bytes(torch.zeros(1).numpy().tobytes())  # not a torch file at all
    with pytest.raises(RefusedFile, match="is not a readable torch file"):
        load_torch(f, "Delete it.")
    torch.save({"w": torch.ones(2)}, f)
    assert torch.equal(load_torch(f, "Delete it.")["w"], torch.ones(2))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ host_stage


class TinyHost(pl.LightningModule):
    """A host model with a validation score; `plant_best` overwrites the best checkpoint once fitting ends."""

    def __init__(self, plant_best: Path | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.plant_best = plant_best

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -self.lin(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        if self.plant_best is not None:
            best = self.trainer.checkpoint_callback.best_model_path
            assert best, "no best checkpoint to plant into"
            plant(Path(best), self.plant_best)


def _host_stage(run_dir: Path, module: TinyHost, *overrides: str, key: dict | None = None, epochs: int = 1):
    data = TensorDataset(torch.randn(8, 2))
    dm = pl.LightningDataModule.from_datasets(train_dataset=data, val_dataset=data, batch_size=4)
    cfg = compose_cfg(["logger=none", *overrides])
    return host_stage(
        cfg,
        run_dir,
        "tiny",
        module,
        dm,
        key=key or {"v": 1},
        monitor="val/score",
        max_epochs=epochs,
        enable_progress_bar=False,
    )


def test_host_cache_payload_is_refused(tmp_path, marker):
    """The `<run>/host/<name>.pt` cache (recsae's `host/sasrec.pt`) that a rerun or resume reads."""
    cache = plant(tmp_path / "host" / "tiny.pt", marker, key={"v": 1})
    with pytest.raises(RefusedFile) as err:
        _host_stage(tmp_path, TinyHost())
    refused(err, cache, "Delete it; saelab then trains tiny again.")
    assert not marker.exists()


def test_best_host_checkpoint_payload_is_refused(tmp_path, marker):
    with pytest.raises(RefusedFile) as err:
        _host_stage(tmp_path, TinyHost(plant_best=marker))
    assert "holds pickled Python objects" in str(err.value) and "checkpoints/tiny" in str(err.value)
    assert not marker.exists()


def test_host_resume_checkpoint_payload_is_refused(tmp_path, marker):
    last = plant(tmp_path / "checkpoints" / "tiny" / "last.ckpt", marker)
    with pytest.raises(RefusedFile) as err:
        _host_stage(tmp_path, TinyHost(), "resume=auto")
    refused(err, last, "Delete it (resume=auto then starts afresh)")
    assert not marker.exists()


def test_host_resume_refuses_a_checkpoint_of_other_settings_and_a_fresh_fit_keeps_unfinished_ones(tmp_path):
    """A host fit killed mid-way leaves checkpoints but no cache: resume=auto continues them only under the
    same key (naming what differs), and a rerun without resume=auto does not overwrite them."""
    _host_stage(tmp_path, TinyHost(), key={"v": 1, "lr": 0.1})
    (tmp_path / "host" / "tiny.pt").unlink()  # as if killed before the cache was written
    ckpts = tmp_path / "checkpoints" / "tiny"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    with pytest.raises(ValueError, match=r"training tiny with other settings \(lr: 0.1 → 0.2\)"):
        _host_stage(tmp_path, TinyHost(), "resume=auto", key={"v": 1, "lr": 0.2})
    with pytest.raises(FileExistsError, match="add resume=auto"):
        _host_stage(tmp_path, TinyHost(), key={"v": 1, "lr": 0.2})
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before
    # the same key continues (to a second epoch); a finished fit's checkpoints give way to a new key's fit
    _host_stage(tmp_path, TinyHost(), "resume=auto", key={"v": 1, "lr": 0.1}, epochs=2)
    assert (tmp_path / "host" / "tiny.pt").exists()
    _, info = _host_stage(tmp_path, TinyHost(), key={"v": 1, "lr": 0.3})
    assert info["tiny/cached"] is False


# ------------------------------------------------------------------------------------- SAE training


def test_resume_path_payload_is_refused(tmp_path, marker):
    ckpt = plant(tmp_path / "elsewhere" / "given.ckpt", marker)
    cfg = compose_cfg([*SMALL, "logger=none", "trainer.max_steps=2", f"resume={ckpt}"])
    with pytest.raises(RefusedFile) as err:
        fit(cfg, tmp_path / "run")
    refused(err, ckpt, "point resume= at another checkpoint")
    assert not marker.exists()


def test_resume_auto_payload_is_refused(tmp_path, marker):
    last = plant(tmp_path / "checkpoints" / "train" / "last.ckpt", marker)
    cfg = compose_cfg([*SMALL, "logger=none", "trainer.max_steps=2", "resume=auto"])
    with pytest.raises(RefusedFile) as err:
        fit(cfg, tmp_path)
    refused(err, last, "Delete it (resume=auto then starts afresh)")
    assert not marker.exists()


@pytest.mark.slow
def test_cli_prints_one_line_for_a_planted_checkpoint(tmp_path, marker, monkeypatch):
    monkeypatch.setitem(support.ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt = plant(tmp_path / "given.ckpt", marker)
    p = run_cli(
        *SMALL, "logger=none", "trainer.max_steps=2", f"resume={ckpt}", run_dir=tmp_path / "run", check=False
    )
    assert p.returncode == 2, p.stderr
    assert f"saelab: error: RefusedFile: {ckpt} holds pickled Python objects besides tensors" in p.stderr
    assert "Traceback" not in p.stderr and not marker.exists()


# ------------------------------------------------------------------------------------------- caches


def _object_npy(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, np.array([Payload(marker)], dtype=object), allow_pickle=True)


def test_activation_cache_shard_payload_is_refused(tmp_path, marker):
    """A shard replaced by a pickled object array, its manifest entry rewritten to match."""
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    cache = build_cache(
        tmp_path,
        lambda: iter([(x, torch.arange(64))]),
        tokens_per_shard=64,
        host_id="toy",
        hook="h",
        corpus_fingerprint="c",
        d_in=4,
        progress=False,
    )
    manifest = json.loads((cache.path / "manifest.json").read_text())
    info = manifest["shards"][0]["files"]["acts"]
    shard = cache.path / info["name"]
    _object_npy(shard, marker)
    info["bytes"], info["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    reopened = type(cache)(cache.path)
    with pytest.raises(
        CacheCorrupt, match=f"{re.escape(str(shard))} is unreadable.*Delete {re.escape(str(cache.path))}"
    ):
        reopened.rows(np.array([0]))
    assert not marker.exists()


def test_embedding_cache_part_payload_is_skipped(tmp_path, marker):
    """A planted `part-*.npz` of object arrays is a cache miss, never unpickled."""
    emb = SentenceEmbedder.__new__(SentenceEmbedder)  # the cache reader alone, without loading a model
    emb.cache_root, emb.dim = tmp_path, 4
    keys = np.array([Payload(marker)], dtype=object)
    np.savez(tmp_path / "part-planted.npz", keys=keys, vecs=np.zeros((1, 4), np.float32))
    assert emb._load_cache() == {}
    assert not marker.exists()
