"""Resume continues the right run: `resume=auto` checks the checkpoint's config, takes the newest complete
checkpoint a kill left, tidies what the kill left, and Ctrl-C saves a checkpoint it continues from."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import compose_cfg
from safetensors.torch import load_file
from support import ENV, ROOT, run_cli, synthetic_small

from saelab.checkpoint import config_differences
from saelab.train import fit, plain

SMALL = [
    *synthetic_small(),
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "checkpoint.every_n_steps=2",
    "logger=none",
    "+trainer.enable_progress_bar=false",
]


def cfg(*overrides: str):
    return compose_cfg([*SMALL, *overrides])


def test_only_the_step_budget_and_how_a_run_is_recorded_may_differ():
    stored = plain(cfg())
    recorded_elsewhere = cfg(
        "trainer.max_steps=5000",  # optim.scheduler.total_steps follows it: not a difference of its own
        "resume=auto",
        "+run_dir=/elsewhere",
        "paths.root_dir=/elsewhere",
        "logger=csv",
        "checkpoint.every_n_steps=7",
        "lit.log_every=3",
    )
    assert config_differences(stored, recorded_elsewhere) == []
    # sae.seed and data.seed interpolate seed: the line names the key that was set
    other = cfg("seed=3", "sae.activation.k=8", "optim.optimizer.lr=0.01")
    assert config_differences(stored, other) == [
        "optim.optimizer.lr: 0.003 → 0.01",
        "sae.activation.k: 4 → 8",
        "seed: 0 → 3",
    ]


def test_resume_auto_refuses_a_checkpoint_written_under_other_settings(tmp_path):
    fit(cfg("trainer.max_steps=2"), tmp_path)
    last = tmp_path / "checkpoints/train/last.ckpt"
    before = last.read_bytes()
    # the seed-0 run's weights must not be continued under seed=1
    with pytest.raises(ValueError, match=r"run with other settings \(seed: 0 → 1\).*new run dir"):
        fit(cfg("seed=1", "trainer.max_steps=4", "resume=auto"), tmp_path)
    assert last.read_bytes() == before
    # the same settings with a longer step budget continue it
    res = fit(cfg("trainer.max_steps=4", "resume=auto"), tmp_path)
    assert res.trainer.ckpt_path == str(last) and res.trainer.global_step == 4


def test_an_explicit_resume_path_is_continued_with_a_note_of_what_differs(tmp_path, capsys):
    fit(cfg("trainer.max_steps=2"), tmp_path / "a")
    path = tmp_path / "a/checkpoints/train/last.ckpt"
    res = fit(cfg("seed=1", "trainer.max_steps=4", f"resume={path}"), tmp_path / "b")
    assert res.trainer.global_step == 4
    assert "its run had other settings (seed: 0 → 1)" in capsys.readouterr().out


def test_a_fresh_run_refuses_a_checkpoint_dir_that_holds_checkpoints(tmp_path):
    fit(cfg("trainer.max_steps=2"), tmp_path)
    ckpts = tmp_path / "checkpoints/train"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    # Lightning would write last-v1.ckpt beside the old run's last.ckpt, which resume=auto later continues
    with pytest.raises(FileExistsError, match=r"already holds checkpoints.*add resume=auto"):
        fit(cfg("trainer.max_steps=2", "seed=1"), tmp_path)
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before


def test_resume_auto_after_kills_mid_write_takes_the_newest_complete_checkpoint_and_tidies(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints/train"
    fit(cfg("trainer.max_steps=2"), tmp_path)
    step2 = (ckpts / "epoch=0-step=2.ckpt").read_bytes()
    # killed during the first last.ckpt write: a complete step checkpoint, an empty temporary, no last.ckpt
    (ckpts / "last.ckpt").unlink()
    (ckpts / ".last.ckpt.tmp-k1ll3d00").touch()
    capsys.readouterr()
    res = fit(cfg("trainer.max_steps=4", "resume=auto"), tmp_path)
    out = capsys.readouterr().out
    assert res.trainer.ckpt_path == str(ckpts / "epoch=0-step=2.ckpt") and res.trainer.global_step == 4
    assert "resuming from epoch=0-step=2.ckpt at step 2" in out
    assert "checkpoints/train/.last.ckpt.tmp-k1ll3d00" in out
    # the step checkpoint it resumed from is gone once a newer one exists (Lightning keeps it)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]

    # killed between writing step 4's checkpoint and deleting step 2's, and during an export
    (ckpts / "epoch=0-step=2.ckpt").write_bytes(step2)
    (tmp_path / ".sae.tmp-k1ll3d01").mkdir()
    (tmp_path / "train" / ".sae.tmp-k1ll3d02").mkdir(parents=True)
    (tmp_path / "train" / ".sae.tmp-notours").mkdir()  # not the name of a saelab temporary: kept
    res = fit(cfg("trainer.max_steps=6", "resume=auto"), tmp_path)
    assert res.trainer.ckpt_path == str(ckpts / "last.ckpt") and res.trainer.global_step == 6
    assert "removed step checkpoints a kill left behind: epoch=0-step=2.ckpt" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=6.ckpt", "last.ckpt"]
    assert not (tmp_path / ".sae.tmp-k1ll3d01").exists()
    assert not (tmp_path / "train/.sae.tmp-k1ll3d02").exists()
    assert (tmp_path / "train" / ".sae.tmp-notours").exists()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resume_auto_continues_to_identical_weights(tmp_path):
    args = [
        *synthetic_small(batch_size=256, d_sae=128),
        "sae=batchtopk",
        "objective/terms=[mse,auxk,ortho]",
        "objective.terms.ortho.chunk_size=32",
        "lit.dead_window_tokens=2000",
        "logger=csv",
        "+logger.flush_logs_every_n_steps=1",  # metrics.csv appears once training has logged a step
        "trainer.max_steps=240",
        "checkpoint.every_n_steps=1000",  # no periodic checkpoint: only Ctrl-C saves one
        "trainer.val_check_interval=80",
    ]
    run_cli(*args, run_dir=tmp_path / "full")
    reference = load_file(tmp_path / "full/sae/sae_weights.safetensors")

    run = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "saelab", *args, f"+run_dir={run}", f"hydra.run.dir={run}/hydra"]
    with open(tmp_path / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err_file)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list(run.glob("csv/**/metrics.csv")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "saelab: stopping after this step to save a checkpoint" in err
    found = re.search(
        r"saelab: interrupted; checkpoints/train/last\.ckpt saved at step (\d+)\. "
        r"Continue with the same overrides plus `resume=auto`\.",
        err,
    )
    assert found, err[-3000:]
    step = int(found.group(1))
    assert 0 < step < 240, "the run finished before it could be interrupted; make it longer"
    ckpts = run / "checkpoints/train"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True, mmap=True)["global_step"] == step
    assert not (run / "sae").exists()

    run_cli(*args, "resume=auto", run_dir=run)
    resumed = load_file(run / "sae/sae_weights.safetensors")
    for name, ref in reference.items():
        assert torch.equal(resumed[name], ref), f"{name} differs after resuming from step {step}"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # one last.ckpt, no last-v1.ckpt


# every SAE variant and every loss term, each resumed halfway and compared with an uninterrupted run
K4 = "sae.activation.k=4"
VARIANTS = {
    "topk": ["sae=topk", K4, "objective/terms=[mse,auxk]"],
    "batchtopk+ortho": [
        "sae=batchtopk",
        K4,
        "objective/terms=[mse,auxk,ortho]",
        "objective.terms.ortho.chunk_size=32",
    ],
    "matryoshka": ["sae=batchtopk", K4, "objective/terms=[matryoshka,auxk]"],
    "topk+matryoshka+fvu": ["sae=topk", K4, "objective/terms=[matryoshka,fvu,auxk]"],
    "jumprelu": ["sae=jumprelu", "objective/terms=[mse,l0]"],
    "relu": ["sae=relu", "objective/terms=[mse,l1]"],
    "tilted": ["sae=topk", K4, "objective/terms=[tilted,auxk]"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_and_term_trains_repeatably_and_resumes_to_identical_weights(variant, tmp_path):
    """A run repeated gives identical weights, and one stopped at step 30 and resumed with resume=auto
    ends where the uninterrupted run does (the schedule and the dead window are pinned to the full run's
    60 steps, so only the step budget differs between the halves)."""
    over = [
        "data.d_in=32",
        "data.n_features=128",
        "data.mean_active=4",
        "trainer.limit_val_batches=1",
        "logger=none",
        "+trainer.enable_progress_bar=false",
        *VARIANTS[variant],
        "data.batch_size=128",
        "sae.d_sae=128",
        "lit.dead_window_tokens=1024",  # latents die within the run, so AuxK works
        "optim.scheduler.total_steps=60",
        "checkpoint.every_n_steps=10",
        "trainer.val_check_interval=20",
    ]

    def weights(res):
        return {k: v.detach().clone() for k, v in res.lit.sae.state_dict().items()}

    full = weights(fit(compose_cfg([*over, "trainer.max_steps=60"]), tmp_path / "full"))
    again = weights(fit(compose_cfg([*over, "trainer.max_steps=60"]), tmp_path / "again"))
    fit(compose_cfg([*over, "trainer.max_steps=30"]), tmp_path / "halves")
    resumed = weights(fit(compose_cfg([*over, "trainer.max_steps=60", "resume=auto"]), tmp_path / "halves"))
    for name, ref in full.items():
        assert torch.equal(again[name], ref), f"{variant}: {name} differs between two identical runs"
        assert torch.equal(resumed[name], ref), f"{variant}: {name} differs after resuming at step 30"
