"""Multiruns through the CLI (saelab/sweep.py, sweeps/, conf/hydra/launcher/): parallel joblib jobs split the
cores, Optuna finds the best of its trials, submitit runs jobs, a W&B sweep's command composes, every
multirun ends with one table (failed jobs listed), jobs share one activation cache, and a rerun sweep
job continues from its checkpoint."""

from __future__ import annotations

import csv
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_cfg
from hydra.core.config_store import ConfigStore
from hydra.types import RunMode
from omegaconf import OmegaConf
from support import ENV, ROOT, save_tiny_causal_lm

from saelab.sweep import cores, find_jobs, is_wandb_sweep, summarize, threads_per_job

# a tiny synthetic run: a few steps, one evaluator, no logger (from +debug=tiny)
QUICK = ["+debug=tiny", "eval/metrics=[core]", "+trainer.enable_progress_bar=false"]
TINY = [*QUICK, "trainer.max_steps=4"]
EV = "eval/explained_variance"


def multirun(
    *args: str, sweep_dir: Path, check: bool = True, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, int]:
    """`python -m saelab -m ARGS hydra.sweep.dir=SWEEP_DIR` (environment ENV | env); the finished process
    and its pid."""
    cmd = [sys.executable, "-m", "saelab", "-m", *args, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    return done, proc.pid


def job(sweep_dir: Path, num: int) -> tuple[dict, dict]:
    """A job's record (job.json) and results.json."""
    d = sweep_dir / str(num)
    return json.loads((d / "job.json").read_text()), json.loads((d / "results.json").read_text())


def csv_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- threads per job


def _config(mode: RunMode, launcher: dict | None = None):
    return OmegaConf.create({"hydra": {"mode": mode, "launcher": launcher or {"_target_": "basic"}}})


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def test_threads_per_job_follow_the_launcher_and_an_explicit_setting_wins(monkeypatch):
    monkeypatch.delenv("SAELAB_THREADS", raising=False)
    n = cores()
    multi, single = RunMode.MULTIRUN, RunMode.RUN
    assert threads_per_job(_config(single)) is None  # a single run keeps all cores
    assert threads_per_job(_config(multi)) is None  # basic launcher: one job at a time
    joblib = {"_target_": JOBLIB, "n_jobs": 2}
    assert threads_per_job(_config(multi, joblib))[0] == max(1, n // 2)  # type: ignore[index]
    assert threads_per_job(_config(multi, joblib | {"n_jobs": -1}))[0] == 1  # type: ignore[index]
    assert threads_per_job(_config(multi, joblib | {"n_jobs": None}))[0] == n  # type: ignore[index]
    assert threads_per_job(_config(multi, joblib | {"n_jobs": 4 * n}))[0] == 1  # type: ignore[index]
    submitit = {"_target_": SUBMITIT, "cpus_per_task": 3}
    assert threads_per_job(_config(multi, submitit)) == (3, "hydra.launcher.cpus_per_task")
    assert threads_per_job(_config(multi, submitit | {"cpus_per_task": None})) is None
    # the callback's `threads`, then SAELAB_THREADS, win over the split, in single runs too
    assert threads_per_job(_config(multi, joblib), explicit=5)[0] == 5  # type: ignore[index]
    assert threads_per_job(_config(single), explicit=5)[0] == 5  # type: ignore[index]
    monkeypatch.setenv("SAELAB_THREADS", "3")
    assert threads_per_job(_config(multi, joblib), explicit=5) == (3, "SAELAB_THREADS")
    assert threads_per_job(_config(single)) == (3, "SAELAB_THREADS")
    monkeypatch.setenv("SAELAB_THREADS", "two")
    with pytest.raises(ValueError, match="SAELAB_THREADS='two': give a whole number"):
        threads_per_job(_config(single))


def test_two_joblib_jobs_each_get_half_the_cores_and_the_sweep_ends_with_one_table(tmp_path):
    sweep = tmp_path / "sweep"
    p, main_pid = multirun(
        *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sae.activation.k=4,8", sweep_dir=sweep
    )
    pids = set()
    for num, k in ((0, 4), (1, 8)):
        record, results = job(sweep, num)
        # set in the loky worker that ran the job, before the task, and still so when it ended
        assert record["torch_threads"] == max(1, cores() // 2), record
        assert record["status"] == "completed" and f"sae.activation.k={k}" in record["overrides"]
        pids.add(record["pid"])
        # each job's printed header names it by its overrides
        assert f"saelab: job {num} [{' '.join(record['overrides'])}] → {sweep / str(num)} (" in p.stdout
        assert results["metrics"]["train/steps"] == 4
    assert main_pid not in pids and len(pids) == 2, "each job ran in a worker process of its own"

    md = (sweep / "summary.md").read_text()
    assert md in p.stdout  # printed too
    assert "2 of 2 jobs finished with results" in md
    assert "| job | status | overrides | eval/explained_variance | eval/l0 | eval/dead_frac | threads |" in md
    rows = csv_rows(sweep)
    assert [(r["job"], r["status"], r["sae.activation.k"], r["dir"]) for r in rows] == [
        ("0", "ok", "4", "0"),
        ("1", "ok", "8", "1"),
    ]
    for r in rows:
        _, results = job(sweep, int(r["job"]))
        assert r["overrides"] == " ".join(
            json.loads((sweep / r["dir"] / "job.json").read_text())["overrides"]
        )
        for key in (EV, "eval/l0", "eval/dead_frac"):
            assert float(r[key]) == pytest.approx(results["metrics"][key])
        assert "eval/ce_loss_score" not in r  # not measured on the synthetic source: no column
        assert int(r["threads"]) == max(1, cores() // 2)


# --- Optuna


def test_optuna_search_writes_the_best_of_its_trials(tmp_path):
    sweep = tmp_path / "sweep"
    p, _ = multirun(
        *TINY,
        "+sweeps=optuna_topk",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=3",
        sweep_dir=sweep,
    )
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    trials = []  # (explained variance, the trial's parameters) of each job
    for num in range(3):
        record, results = job(sweep, num)
        params = dict(o.split("=", 1) for o in record["overrides"] if o.startswith(("sae.", "optim.")))
        assert set(params) == {"sae.activation.k", "optim.optimizer.lr"}
        assert int(params["sae.activation.k"]) in (4, 8, 16, 32)
        assert 0.0003 <= float(params["optim.optimizer.lr"]) <= 0.01
        trials.append((results["metrics"][EV], params))
    top, winner = max(trials, key=lambda t: t[0])
    assert best.best_value == pytest.approx(top)
    assert best.best_params["sae.activation.k"] == int(winner["sae.activation.k"])
    assert best.best_params["optim.optimizer.lr"] == pytest.approx(float(winner["optim.optimizer.lr"]))
    assert [r["status"] for r in csv_rows(sweep)] == ["ok"] * 3
    assert "alembic" not in p.stdout + p.stderr  # optuna's alembic import logs nothing


def test_optuna_stores_a_study_in_sqlite(tmp_path):
    """The pin in pyproject.toml: optuna 2.10 (the sweeper's cap) needs SQLAlchemy < 2 for a stored study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.load_study(study_name="s", storage=url)
    assert len(again.trials) == 2 and again.best_value == study.best_value


def test_optuna_sweep_file_chooses_the_sweeper_and_is_seeded():
    cfg = compose_cfg(["+sweeps=optuna_topk"])
    assert cfg.sae.activation.k == 8  # the search space is the sweeper's, not the run's
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        full = compose("config", overrides=["+sweeps=optuna_topk", "seed=3"], return_hydra_config=True)
    sweeper = full.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_ and sweeper.direction == "maximize"
    assert sweeper.sampler.seed == 3 and "TPESampler" in sweeper.sampler._target_
    assert set(sweeper.params) == {"sae.activation.k", "optim.optimizer.lr"}
    assert full.optimized_metric == EV


# --- submitit


def test_submitit_local_runs_two_jobs_to_completion(tmp_path):
    sweep = tmp_path / "sweep"
    _, main_pid = multirun(*TINY, "hydra/launcher=submitit_local", "sae.activation.k=4,8", sweep_dir=sweep)
    for num in (0, 1):
        record, results = job(sweep, num)
        assert record["status"] == "completed" and record["pid"] != main_pid  # a submitit job process
        assert results["metrics"]["train/steps"] == 4
    assert [(r["job"], r["status"]) for r in csv_rows(sweep)] == [("0", "ok"), ("1", "ok")]
    assert list((sweep / ".submitit").glob("*/*_0_log.out")), "submitit's own logs"


def test_slurm_launcher_config_asks_for_a_partition(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    compose_cfg([])  # registers the sweeps group as the CLI does
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        full = compose(
            "config",
            overrides=["hydra/launcher=saelab_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = full.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.tasks_per_node, launcher.gpus_per_node) == ("gpu", 1, 1)
    assert launcher.cpus_per_task >= 1 and launcher.timeout_min >= 60 and launcher.max_num_timeout >= 1
    # without a partition the multirun stops before anything is submitted, with one line
    p, _ = multirun("hydra/launcher=saelab_slurm", sweep_dir=tmp_path / "sweep", check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "saelab: error: hydra.launcher.partition is required here: add hydra.launcher.partition=<partition> "
        "to the command line."
    )
    assert not (tmp_path / "sweep").exists()


# --- W&B


def test_wandb_sweep_command_composes_under_hydra():
    path = ROOT / "sweeps" / "wandb_topk.yaml"
    spec = yaml.safe_load(path.read_text())
    assert is_wandb_sweep(spec)
    assert spec["method"] in ("grid", "random", "bayes")
    assert spec["metric"] == {"name": EV, "goal": "maximize"}
    # one parameter set as the W&B controller draws it, expanded by the agent's own code
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    rnd = random.Random(0)
    drawn = {}
    for name, dist in spec["parameters"].items():
        if "values" in dist:
            drawn[name] = rnd.choice(dist["values"])
        else:
            assert dist["distribution"] == "log_uniform_values"
            drawn[name] = dist["min"] * (dist["max"] / dist["min"]) ** rnd.random()
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in drawn.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [spec["program"]]}
    command: list[str] = []
    for part in spec["command"]:
        part = str(part)
        command += macros[part[2:-1]] if part.startswith("${") else [part]
    assert command[:4] == ["/usr/bin/env", "python", "-m", "saelab"]
    overrides = command[4:]
    assert [o for o in overrides if "=" not in o] == []
    cfg = compose_cfg(overrides)
    assert cfg.sae.activation.k == drawn["sae.activation.k"]
    assert cfg.optim.optimizer.lr == pytest.approx(drawn["optim.optimizer.lr"])
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.offline is False
    assert (
        cfg.optimized_metric == spec["metric"]["name"]
    )  # the metric W&B reads is the one Hydra sweepers get
    # the spec is not a Hydra config: the `sweeps` group leaves it out
    assert "wandb_topk.yaml" not in ConfigStore.instance().list("sweeps")
    assert "optuna_topk.yaml" in ConfigStore.instance().list("sweeps")


# --- the summary table


def test_a_failed_job_is_listed_with_its_error_not_dropped(tmp_path):
    sweep = tmp_path / "sweep"
    # (SAELAB_THREADS=1: an explicit thread count wins; the basic launcher alone would keep every core)
    p, _ = multirun(*TINY, "sae.activation.k=0,4", sweep_dir=sweep, check=False, env={"SAELAB_THREADS": "1"})
    assert p.returncode == 1  # the basic sweeper fails the multirun once the batch has run
    rows = csv_rows(sweep)
    assert [r["threads"] for r in rows] == ["1", "1"]
    assert [(r["job"], r["status"], r["sae.activation.k"]) for r in rows] == [
        ("0", "failed", "0"),
        ("1", "ok", "4"),
    ]
    assert rows[0]["error"].startswith("ConfigError: sae.activation.k=0 is not a positive integer")
    assert rows[0][EV] == "" and float(rows[1][EV]) > -1
    md = (sweep / "summary.md").read_text()
    assert "1 of 2 jobs finished with results" in md and "| 0 | failed: ConfigError: sae.activation.k=0" in md
    assert md in p.stdout


def test_summary_reads_job_dirs_without_records_and_per_stage_metrics(tmp_path):
    """Jobs seen only through Hydra's .hydra/overrides.yaml, a job killed mid-run (its record still says
    running) and a recipe's per-stage metric keys (`<stage>/eval/...`)."""

    def make(num: int, overrides: list[str], metrics: dict | None, record: dict | None = None) -> None:
        d = tmp_path / str(num)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
        (d / ".hydra/hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
        if metrics is not None:
            (d / "results.json").write_text(json.dumps({"name": "x", "metrics": metrics}))
        if record is not None:
            (d / "job.json").write_text(json.dumps(record))

    make(
        0, ["name=a", "sae.d_sae=64"], {"topk/eval/explained_variance": 0.5, "topk/eval/l0": 8.0, "other": 1}
    )
    make(1, ["name=a", "sae.d_sae=128"], None)
    make(
        2,
        ["name=a", "sae.d_sae=256"],
        None,
        {"num": 2, "overrides": ["name=a", "sae.d_sae=256"], "status": "running"},
    )
    (tmp_path / "0" / "train" / ".hydra").mkdir(parents=True)  # not a job of its own
    (tmp_path / "0" / "train" / ".hydra/overrides.yaml").write_text("[]")
    assert [j["num"] for j in find_jobs(tmp_path)] == [0, 1, 2]
    md, text = summarize(tmp_path, [EV, "eval/l0"])
    rows = list(csv.DictReader(text.splitlines()))
    assert [(r["job"], r["status"], r["sae.d_sae"]) for r in rows] == [
        ("0", "ok", "64"),
        ("1", "no results.json", "128"),
        ("2", "stopped", "256"),
    ]
    assert rows[0]["topk/eval/explained_variance"] == "0.5" and "other" not in rows[0]
    assert "every job has `name=a`" in md and "| 2 | stopped | sae.d_sae=256 |" in md


# --- shared cache and resume


@pytest.mark.slow  # two jobs that each load a text corpus and a (tiny) language model: ~1 min on 2 cores
def test_parallel_jobs_on_the_text_source_share_one_activation_cache(tmp_path):
    host = save_tiny_causal_lm(tmp_path / "tiny", "llama", n_layers=3, hidden=32)
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    text = ["data=text", f"data.host.model={host}", "data.host.hook=1", "data.host.d_in=32", "sae.d_sae=64"]
    p, _ = multirun(
        *TINY, *text, f"data.cache_dir={cache}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "sae.activation.k=4,8", sweep_dir=sweep,
    )  # fmt: skip
    # one cache per split, harvested by one job: the other waited on its lock or found it built
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2
    log = p.stdout + p.stderr
    for split in ("train", "val"):  # a harvest opens its progress bar at 0% once
        assert len(re.findall(rf"harvest {split} \([^)]*\):\s+0%", log)) == 1, log[-3000:]
    assert [r["status"] for r in csv_rows(sweep)] == ["ok", "ok"]


def test_a_rerun_sweep_job_continues_from_its_checkpoint(tmp_path):
    """A sweep whose second job was killed after its step-4 checkpoint (results and export not yet written),
    rerun with resume=auto and the same sweep dir (and a longer budget): each job continues where its
    checkpoint stands instead of starting again (a fresh run would refuse the dir's checkpoints)."""
    sweep = tmp_path / "sweep"
    common = [*QUICK, "checkpoint.every_n_steps=2", "sae.activation.k=4,8"]
    multirun(*common, "trainer.max_steps=4", sweep_dir=sweep)
    killed = sweep / "1"
    (killed / "results.json").unlink()
    for p in (killed / "sae").iterdir():
        p.unlink()
    killed.joinpath("sae").rmdir()
    ckpt = killed / "checkpoints/train/last.ckpt"
    assert torch.load(ckpt, weights_only=True, mmap=True)["global_step"] == 4

    p, _ = multirun(*common, "trainer.max_steps=8", "resume=auto", sweep_dir=sweep)
    for num in (0, 1):
        record, results = job(sweep, num)
        assert results["metrics"]["train/steps"] == 8 and record["status"] == "completed"
        last = sweep / str(num) / "checkpoints/train/last.ckpt"
        assert torch.load(last, weights_only=True, mmap=True)["global_step"] == 8
    assert (killed / "sae" / "cfg.json").exists()
    log = p.stdout + p.stderr
    assert f"Restoring states from the checkpoint path at {ckpt}" in log, log[-3000:]
    assert [r["status"] for r in csv_rows(sweep)] == ["ok", "ok"]
