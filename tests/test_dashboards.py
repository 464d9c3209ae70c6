"""Dashboards: density histograms over training, the LR curve, report figures and the export artifact reach
the offline W&B run (read back from its `.wandb` file), the heatmap reaches the run dir, and csv / none
loggers run the same fit without W&B."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_cfg
from support import synthetic_small
from torch.utils.data import DataLoader

from saelab.analysis import plots
from saelab.analysis.features import FeatureRecords
from saelab.dashboards import (
    DENSITY_KEY,
    artifact_name,
    context_html,
    contexts_table,
    density_edges,
    density_histogram,
)
from saelab.eval.base import Table
from saelab.report import Report
from saelab.stage import StageResult, train_stage
from saelab.train import fit


# ---------------------------------------------------------------------- counting, by hand
def test_density_histogram_counts_latents_per_log10_frequency_bin():
    # 1000 tokens, 2 bins on [-4, 0] (width 2) and the silent bin: f = 0, 0, 1e-3, 5e-3, 0.02, 0.5, 1
    fired = torch.tensor([0, 0, 1, 5, 20, 500, 1000])
    # log10 f: -3 and -2.3 fall in [-4, -2) → bin 1; -1.7, -0.3 and 0 (closed last edge) in [-2, 0] → bin 2
    assert density_histogram(fired, 1000, bins=2, log10_min=-4.0).tolist() == [2, 2, 3]
    # below the first edge counts in the first bin: f = 1e-3 with log10_min = -2 → bin 1, not dropped
    assert density_histogram(torch.tensor([1, 0]), 1000, bins=4, log10_min=-2.0).tolist() == [1, 1, 0, 0, 0]
    assert np.allclose(density_edges(2, -4.0), [-6.0, -4.0, -2.0, 0.0])  # silent bin left of -4


def test_density_histogram_refuses_an_empty_window_and_bad_bins():
    with pytest.raises(ValueError, match="at least one token"):
        density_histogram(torch.zeros(3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="density_log10_min"):
        density_histogram(torch.zeros(3, dtype=torch.long), 10, bins=5, log10_min=1.0)


# ---------------------------------------------------------------------- offline W&B run files
def wandb_records(run_dir: Path, wait: float = 60.0) -> list:
    """The protobuf records of the one offline run under `run_dir/wandb`, once its `exit` record is written.

    W&B's service process writes the file; now and then (a few runs in a hundred here) the file was not
    there yet, or had not all its records, when `wandb.finish()` had returned, so this waits up to `wait`
    seconds for the run's `exit` record."""
    deadline = time.monotonic() + wait
    while True:
        found = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        records = _read_records(found[0]) if len(found) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            assert len(found) == 1, f"expected one offline run file under {run_dir}/wandb, found {found}"
            return records
        time.sleep(0.2)


def _read_records(path: Path) -> list:
    """The records of a `.wandb` file: a LevelDB log (32 KiB blocks of chunks with a 7-byte header: crc32,
    length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte `:W&B` file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    if len(data) < 7:
        return []
    assert data[:4] == b":W&B"
    pos, parts, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + n > len(data):  # a chunk still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            parts = chunk
        elif kind in (3, 4):
            parts += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def history(records: list) -> list[dict]:
    """Each logged row as {key: decoded value}; media and histograms come as their nested keys joined."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


class FixedBatch(pl.LightningDataModule):
    """The same [batch, d_in] batch at every training and validation step (a `fit` data source)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x, self.d_in = x, x.shape[1]

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.x] * 1000, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([self.x], batch_size=None)


# the steps change no weight (Adam moves each by ~lr), so every step's firings are those of the final SAE
FROZEN = [
    *synthetic_small(batch_size=32),
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "lit.log_every=1",
    "optim.optimizer.lr=1e-30",
    "optim.scheduler.warmup_steps=0",
    "dashboards.density_every=4",
    "dashboards.density_bins=10",
    "+trainer.enable_progress_bar=false",
]


def test_an_offline_wandb_run_gets_density_lr_figures_tables_and_the_export(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # W&B's own files stay in tmp_path
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    run_dir = tmp_path / "run"
    fig = plots.histogram([1.0, 2.0, 2.5], tmp_path / "h.png", "x", "a figure")

    def report(stage: StageResult) -> Report:
        r = Report(run_dir, "t", "dash").add_metrics(stage.metrics)
        r.add_contexts("Top contexts", _tiny_records(), lambda t: f" t{t}", [0, 1], k=5)
        return r.add_table("Per latent", Table(["latent", "act"], [[0, 1.5]])).add_figure("my fig", fig)

    cfg = compose_cfg([*FROZEN, "logger=wandb_offline", "name=dash"])
    out = train_stage(cfg, run_dir, "train", datamodule=FixedBatch(x), metrics={}, report=report)
    records = wandb_records(run_dir)
    rows = history(records)

    # density: after steps 4 and 8 (windows of 4 steps) and at fit end (the 2 steps since), counted by hand
    # on the batch every step saw
    dense = [r for r in rows if f"{DENSITY_KEY}/values" in r]
    assert [r["trainer/global_step"] for r in dense] == [4, 8, 10]
    per_batch = (out.sae(x).codes != 0).sum(0)
    edges = density_edges(10, -7.0)
    for r, steps in zip(dense, (4, 4, 2)):
        f = (per_batch * steps).double() / (32 * steps)
        silent = int((f == 0).sum())
        firing, _ = np.histogram(np.log10(f[f > 0].numpy()), bins=edges[1:])
        assert r[f"{DENSITY_KEY}/values"] == [silent, *firing.tolist()]
        assert np.allclose(r[f"{DENSITY_KEY}/bins"], edges)
        assert sum(r[f"{DENSITY_KEY}/values"]) == 64  # every latent once
    # the dead-latent curve and the LR carry the step axis
    assert any("sparsity/dead_frac" in r and "trainer/global_step" in r for r in rows)
    assert [r["trainer/global_step"] for r in rows if "lr-Adam" in r] == list(range(10))
    # the heatmap, its numbers, and the report's figure and table
    saved = json.loads((run_dir / "train/density_over_training.json").read_text())
    assert saved["steps"] == [4, 8, 10] and saved["counts"] == [r[f"{DENSITY_KEY}/values"] for r in dense]
    assert (run_dir / "train/density_over_training.png").stat().st_size > 0
    media = {k.split("/_type")[0]: v for r in rows for k, v in r.items() if k.endswith("/_type")}
    assert media["figures/density_over_training"] == "image-file"
    assert media["figures/my_fig"] == "image-file" and media["tables/per_latent"] == "table-file"
    assert media["tables/top_contexts"] == "table-file"
    (table_file,) = run_dir.glob("wandb/offline-run-*/files/media/table/tables/top_contexts_*.table.json")
    logged = json.loads(table_file.read_text())
    assert logged["columns"] == ["latent", "density", "rank", "activation", "context"]
    assert [row[:4] for row in logged["data"]] == [[0, 0.05, 0, 3.0], [0, 0.05, 1, 1.0], [1, 0.01, 0, 2.0]]
    # report.md has the same contexts as text, firing tokens in <<marks>>
    md = (run_dir / "report.md").read_text()
    assert (
        "| 0 | 5.00e-02 | 0 | 3 |  t1<< t2>><< t3>> |" in md
        and "| 1 | 1.00e-02 | 0 | 2 |  t6<< t7>> t8 |" in md
    )
    (run,) = run_dir.glob("wandb/offline-run-*")
    assert len(list(run.glob("files/media/images/figures/*.png"))) == 2
    # the export, as a model artifact named after the run, whose files are the export in the run dir
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (art,) = [a for a in artifacts if a.type == "model"]  # W&B stores each logged table as one too
    assert art.name == "dash-train"
    files = {e.path: Path(e.local_path) for e in art.manifest.contents}
    assert files.keys() == {p.name for p in out.export.iterdir()}
    assert all(p.resolve() == (out.export / name).resolve() for name, p in files.items())


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_other_loggers_get_the_heatmap_and_no_wandb(tmp_path, logger):
    cfg = compose_cfg([*FROZEN, f"logger={logger}"])
    res = fit(cfg, tmp_path, datamodule=FixedBatch(torch.randn(32, 32)))
    assert res.trainer.global_step == 10
    assert json.loads((tmp_path / "train/density_over_training.json").read_text())["steps"] == [4, 8, 10]
    assert not (tmp_path / "wandb").exists()
    if logger == "csv":  # the learning rate is logged wherever a logger is
        (metrics,) = tmp_path.glob("csv/train/version_*/metrics.csv")
        assert "lr-Adam" in metrics.read_text().splitlines()[0]


def test_density_every_0_turns_the_histograms_off(tmp_path):
    fit(compose_cfg([*FROZEN, "logger=none", "dashboards.density_every=0"]), tmp_path)
    assert not (tmp_path / "train/density_over_training.png").exists()


# ---------------------------------------------------------------------- contexts and names
def test_context_html_shades_tokens_by_activation_and_escapes_them():
    page = context_html([-1, 7, 8], [0.0, 2.0, 1.0], lambda t: {7: "<b>", 8: " x"}[t], peak=4.0, center=1)
    assert page.count("<span") == 2  # the id outside the document is left out
    assert 'rgba(255, 140, 0, 0.50); outline: 1px solid #333" title="2">&lt;b&gt;</span>' in page
    assert 'rgba(255, 140, 0, 0.25)" title="1"> x</span>' in page


def _tiny_records():
    """Two latents, two top slots (latent 1's second empty), windows of 3 tokens."""
    d, k, w = 2, 2, 3  # latents, top contexts, window tokens (1 left, 1 right)
    ints = lambda *s: torch.zeros(*s, dtype=torch.long)  # noqa: E731
    top_act = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    return FeatureRecords(
        n_tokens=100, window=(1, 1), log10_range=(-6.0, 2.0), count=torch.tensor([5, 1]),
        act_sum=torch.tensor([6.0, 2.0]), hist=ints(d, 4), top_act=top_act,
        top_row=torch.tensor([[0, 1], [2, -1]]), top_doc=ints(d, k), top_pos=ints(d, k),
        top_tokens=torch.tensor([[[1, 2, 3], [4, 5, -1]], [[6, 7, 8], [0, 0, 0]]]),
        top_window_acts=torch.tensor([[[0.0, 3.0, 1.5], [0.0, 1.0, 0.0]], [[0.0, 2.0, 0.0], [0.0] * 3]]),
        sample_act=torch.zeros(d, 0), sample_row=ints(d, 0), sample_doc=ints(d, 0), sample_pos=ints(d, 0),
        sample_quantile=ints(d, 0), sample_tokens=ints(d, 0, w), sample_window_acts=torch.zeros(d, 0, w),
    )  # fmt: skip


def test_contexts_table_has_a_row_per_top_context_with_html_cells():
    import wandb

    records = _tiny_records()
    table = contexts_table(records, lambda t: f"t{t}", latents=[0, 1], k=5)
    assert isinstance(table, wandb.Table) and table.columns == [
        "latent",
        "density",
        "rank",
        "activation",
        "context",
    ]
    # latent 1's second slot is empty (row -1): three contexts in all
    assert [row[:4] for row in table.data] == [[0, 0.05, 0, 3.0], [0, 0.05, 1, 1.0], [1, 0.01, 0, 2.0]]
    cell = table.data[0][4]
    assert isinstance(cell, wandb.Html) and 'title="1.5">t3</span>' in cell.html and "0.50" in cell.html


def test_artifact_names_keep_only_what_wandb_allows():
    assert artifact_name("train/train sae.activation.k=4") == "train-train-sae.activation.k-4"
    assert artifact_name("///") == "sae" and len(artifact_name("x" * 300)) == 128
