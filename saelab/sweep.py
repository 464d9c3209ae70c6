"""Multiruns that use the machine and end with one table: Hydra callbacks registered in conf/config.yaml.

`ThreadsPerJob` splits the cores among the jobs that run at once. Each job of a joblib multirun runs in a
loky worker process (`hydra_joblib_launcher._core.execute_job` → `hydra.core.utils.run_job`, which calls
`on_job_start` in that process, just before the task), and torch in every worker would otherwise start as
many intra-op threads as the machine has cores: N jobs × all cores. The callback sets torch's intra-op
threads to `cores // jobs at once` (at least 1) and exports OMP_NUM_THREADS / MKL_NUM_THREADS /
OPENBLAS_NUM_THREADS with that number for the job's own child processes. The number, first that applies:

1. `SAELAB_THREADS=<n>` in the environment (any run, single or multirun);
2. `hydra.callbacks.threads.threads=<n>` (any run);
3. a joblib multirun: cores // n_jobs, with n_jobs read from `hydra.launcher.n_jobs` as joblib reads it
   (-1 = one job per core, so one thread each; `hydra.launcher.n_jobs=2`: half the cores each);
4. a submitit multirun (`hydra/launcher=submitit_local`, `saelab_slurm`): `hydra.launcher.cpus_per_task`
   when it is set;
5. otherwise nothing changes: a single run, and the jobs of the basic launcher (one after another in one
   process), keep all cores.

`SweepSummary` records each job of a multirun in `<job dir>/job.json` (its overrides, status, error, torch
threads), prints a header line that names the job by its overrides (parallel jobs interleave their output),
and at the end of the multirun writes one table, a row per job (its overrides, status and the headline
metrics of its results.json), to `<sweep dir>/summary.md` and `summary.csv` and prints it. Hydra calls
`on_multirun_end` only when every job succeeded (a failed job makes the sweeper raise), so the table is also
written when the multirun's process exits without it: a failed, stopped or interrupted job is listed with
its status, not dropped.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from saelab.files import atomic_write_json, atomic_write_text

log = logging.getLogger("saelab")

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
JOB_RECORD = "job.json"  # written into each job's dir by SweepSummary
HEADLINE = ("eval/explained_variance", "eval/l0", "eval/dead_frac", "eval/ce_loss_score")


class JobFailed(RuntimeError):
    """A job of a multirun stopped with an error; the message is the one line `saelab: error:` printed.

    Raised (instead of exiting) so that Hydra records the job as failed, the launcher runs the other jobs,
    and the sweeper decides what a failure means (the basic sweeper fails the multirun after the batch;
    Optuna marks the trial failed and stops past `hydra.sweeper.max_failure_rate`)."""


def required(key: str, what: str) -> str:
    """`${saelab.required:KEY,WHAT}`: a value the user must set on the command line. A plain `???` cannot
    say so where the config extends a structured one (merging `???` keeps the default, e.g. the
    `partition: null` of submitit_slurm); this fails, naming the key, when the value is read.
    `ThreadsPerJob.on_multirun_start` finds one left in `hydra.launcher` before Hydra builds the launcher
    and stops the multirun with that line alone (`check_launcher`)."""
    raise ValueError(_required_message(key, what))


def _required_message(key: str, what: str) -> str:
    return f"{key} is required here: add {key}=<{what}> to the command line."


def check_launcher(config: DictConfig) -> None:
    """Stop with one line (exit status 1) where a `hydra.launcher` value is still
    `${saelab.required:KEY,WHAT}`. SystemExit, because Hydra turns any Exception a callback raises into a
    warning and goes on, and here it would go on to a long OmegaConf traceback."""
    launcher = OmegaConf.select(config, "hydra.launcher")
    raw = OmegaConf.to_container(launcher, resolve=False) if launcher is not None else {}
    for value in (raw or {}).values() if isinstance(raw, dict) else ():
        found = re.fullmatch(r"\$\{saelab\.required:\s*([^,}]+),\s*([^}]*)\}", str(value).strip())
        if found:
            raise SystemExit(
                f"saelab: error: {_required_message(found.group(1).strip(), found.group(2).strip())}"
            )


if not OmegaConf.has_resolver("saelab.required"):
    OmegaConf.register_new_resolver("saelab.required", required)


def is_multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def is_wandb_sweep(spec: Any) -> bool:
    """Whether a YAML mapping is a W&B sweep spec (`method` and `parameters`, no `hydra` node), which
    `wandb sweep FILE` reads, rather than a Hydra sweep config of the `sweeps` group."""
    return (
        isinstance(spec, (dict, DictConfig))
        and "method" in spec
        and "parameters" in spec
        and "hydra" not in spec
    )


def cores() -> int:
    """CPUs this process may use: `os.cpu_count()` limited by its affinity mask and cgroup CPU quota (under
    taskset, a container's --cpus or a SLURM allocation), as joblib counts them for its own workers."""
    from joblib import cpu_count

    return max(1, int(cpu_count()))


def _whole(value: Any, where: str) -> int:
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{where}={value!r}: give a whole number of threads per job, at least 1.")
    return n


def parallel_jobs(launcher: DictConfig | None, n_cores: int) -> int | None:
    """How many jobs a joblib launcher runs at once (joblib's reading of `n_jobs`: None = 1, -1 = one per
    core, -2 = all cores but one, ...), or None for any other launcher."""
    if launcher is None or "JoblibLauncher" not in str(launcher.get("_target_", "")):
        return None
    n_jobs = launcher.get("n_jobs")
    if n_jobs is None:
        return 1
    n = int(n_jobs)
    return max(1, n_cores + 1 + n) if n < 0 else max(1, n)


def threads_per_job(config: DictConfig, explicit: int | None = None) -> tuple[int, str] | None:
    """The torch threads this job should use and why, or None to leave them as they are (see the module
    docstring for the order). `config` is the job's config with its `hydra` node."""
    if os.environ.get("SAELAB_THREADS"):
        return _whole(os.environ["SAELAB_THREADS"], "SAELAB_THREADS"), "SAELAB_THREADS"
    if explicit is not None:
        return _whole(explicit, "hydra.callbacks.threads.threads"), "hydra.callbacks.threads.threads"
    if not is_multirun(config):
        return None
    launcher = OmegaConf.select(config, "hydra.launcher")
    n_cores = cores()
    if (jobs := parallel_jobs(launcher, n_cores)) is not None:
        return max(1, n_cores // jobs), f"{n_cores} cores / {jobs} joblib jobs at once"
    if (
        launcher is not None
        and "submitit" in str(launcher.get("_target_", ""))
        and launcher.get("cpus_per_task")
    ):
        return int(launcher.cpus_per_task), "hydra.launcher.cpus_per_task"
    return None


def set_threads(n: int) -> None:
    """Torch intra-op threads (OpenMP and MKL inside torch) in this process, and the thread variables of the
    OpenMP / MKL / OpenBLAS runtimes of the processes it starts (DataLoader workers, DDP ranks)."""
    import torch

    torch.set_num_threads(n)
    for var in THREAD_VARS:
        os.environ[var] = str(n)


class ThreadsPerJob(Callback):
    """Give each job of a parallel multirun its share of the cores (see the module docstring).

    Args:
        threads: torch threads per job for every run, multirun or not (None: the share of the cores in a
            parallel multirun, all cores otherwise). SAELAB_THREADS in the environment wins over it.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In the multirun's process, before Hydra builds the sweeper and launcher: a required launcher
        setting left unset stops here, and n_jobs above the core count is worth a warning."""
        check_launcher(config)
        n_cores = cores()
        jobs = parallel_jobs(OmegaConf.select(config, "hydra.launcher"), n_cores)
        if jobs is not None and jobs > n_cores and not (self.threads or os.environ.get("SAELAB_THREADS")):
            log.warning(
                f"saelab: hydra.launcher.n_jobs runs {jobs} jobs at once on {n_cores} cores: each gets one "
                f"thread and several jobs still share a core; hydra.launcher.n_jobs={n_cores} or fewer "
                "gives each its own."
            )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        chosen = threads_per_job(config, self.threads)
        if chosen is None:
            return
        n, why = chosen
        set_threads(n)
        # a job of a multirun names its threads in its header line (SweepSummary) and job.json
        level = logging.DEBUG if is_multirun(config) else logging.INFO
        log.log(level, f"saelab: {n} torch thread{'s' * (n != 1)} ({why})")


def job_label(overrides: Iterable[str]) -> str:
    """A job's task overrides as one string, without those of Hydra itself (`hydra.*`, `hydra/...`)."""
    return " ".join(o for o in overrides if not o.lstrip("+~").startswith("hydra"))


class SweepSummary(Callback):
    """Record each job of a multirun and write one table across them at its end (see the module docstring).

    Args:
        metrics: headline metric names; a column for each key of a job's results.json `metrics` that is
            one of them or ends with `/<one of them>` (a recipe's per-stage copies), in this order, after
            the config's `optimized_metric`. Only names some job has become columns.
    """

    def __init__(self, metrics: Sequence[str] = HEADLINE) -> None:
        self.metrics = list(metrics)
        self._optimized: str | None = None  # the config's optimized_metric, first column
        self._pending: tuple[Path, int] | None = None  # (sweep dir, pid) until the table is written

    # --- in the process that runs the job

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        import torch

        job_dir = Path(config.hydra.runtime.output_dir)
        overrides = list(config.hydra.overrides.task)
        record = {
            "num": int(config.hydra.job.num),
            "overrides": overrides,
            "status": "running",  # left so by a job that is killed or exits without returning
            "pid": os.getpid(),
            "started": time.time(),
            "torch_threads": torch.get_num_threads(),
        }
        atomic_write_json(job_dir / JOB_RECORD, record)
        n = record["torch_threads"]
        print(
            f"saelab: job {record['num']} [{job_label(overrides)}] → {job_dir} ({n} torch thread{'s' * (n != 1)})",
            flush=True,
        )

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        import torch
        from hydra.core.utils import JobStatus

        path = Path(config.hydra.runtime.output_dir) / JOB_RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {"num": int(config.hydra.job.num), "overrides": list(config.hydra.overrides.task)}
        failed = job_return is not None and job_return.status == JobStatus.FAILED
        record["status"] = "failed" if failed else "completed"
        if failed:
            err = getattr(job_return, "_return_value", None)
            record["error"] = str(err) if isinstance(err, JobFailed) else f"{type(err).__name__}: {err}"
        record["ended"] = time.time()
        record["torch_threads"] = torch.get_num_threads()  # what the task ran with
        atomic_write_json(path, record)

    # --- in the process that runs the multirun

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._pending = (Path(str(config.hydra.sweep.dir)), os.getpid())
        self._optimized = config.get("optimized_metric")
        atexit.register(self._at_exit)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(Path(str(config.hydra.sweep.dir)))

    def _at_exit(self) -> None:
        """The multirun's process exits without `on_multirun_end` (a job failed, Ctrl-C): table anyway."""
        if self._pending is not None and self._pending[1] == os.getpid():
            try:
                self._write(self._pending[0])
            except Exception as e:  # noqa: BLE001 - exiting already; say why there is no table
                print(f"saelab: no sweep summary ({type(e).__name__}: {e})", flush=True)

    def _write(self, sweep_dir: Path) -> None:
        self._pending = None
        if not sweep_dir.is_dir():
            return
        metrics = [m for m in [self._optimized, *self.metrics] if m]
        md, table_csv = summarize(sweep_dir, list(dict.fromkeys(metrics)))
        atomic_write_text(sweep_dir / "summary.md", md)
        atomic_write_text(sweep_dir / "summary.csv", table_csv)
        print(f"\n{md}", flush=True)


def find_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job under `sweep_dir`: a dir with a job record (`job.json`) or Hydra's `.hydra/overrides.yaml`,
    as {num, overrides, status, dir, error, torch_threads, metrics}, in job order."""
    dirs = {p.parent for p in sweep_dir.rglob(JOB_RECORD)}
    dirs |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs.discard(sweep_dir)
    # a recipe's own subfolders are not jobs: keep the outermost
    dirs = {d for d in dirs if not any(o != d and o in d.parents for o in dirs)}
    return sorted(
        (_job(d, sweep_dir) for d in dirs), key=lambda j: (j["num"] is None, j["num"] or 0, j["dir"])
    )


def _job(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = {}
    if (job_dir / JOB_RECORD).is_file():
        try:
            record = json.loads((job_dir / JOB_RECORD).read_text())
        except ValueError:
            record = {}
    if "overrides" not in record and (job_dir / ".hydra/overrides.yaml").is_file():
        record["overrides"] = list(OmegaConf.load(job_dir / ".hydra/overrides.yaml"))
    if record.get("num") is None and (job_dir / ".hydra/hydra.yaml").is_file():
        record["num"] = OmegaConf.select(OmegaConf.load(job_dir / ".hydra/hydra.yaml"), "hydra.job.num")
    metrics: dict[str, Any] = {}
    results = job_dir / "results.json"
    status = record.get("status")
    if status == "failed":
        shown = "failed"
    elif status == "running":  # no end recorded: killed, interrupted, or exited with an error
        shown = "stopped"
    elif results.is_file():
        try:
            metrics = dict(json.loads(results.read_text()).get("metrics") or {})
            shown = "ok"
        except (ValueError, AttributeError):
            shown = "unreadable results.json"
    else:
        shown = "no results.json"
    return {
        "num": record.get("num"),
        "overrides": [str(o) for o in record.get("overrides", [])],
        "status": shown,
        "error": record.get("error", ""),
        "torch_threads": record.get("torch_threads"),
        "dir": str(job_dir.relative_to(sweep_dir)),
        "metrics": metrics,
    }


def metric_columns(jobs: Sequence[dict[str, Any]], wanted: Sequence[str]) -> list[str]:
    """The metric keys some job has that are in `wanted` or end with `/<wanted>`, in `wanted`'s order."""
    present = sorted({k for j in jobs for k in j["metrics"]})
    cols: list[str] = []
    for name in wanted:
        cols += [k for k in present if (k == name or k.endswith("/" + name)) and k not in cols]
    return cols


def summarize(sweep_dir: Path, wanted: Sequence[str]) -> tuple[str, str]:
    """(Markdown, CSV) of the jobs under `sweep_dir`: one row per job. Markdown shows the overrides that
    differ between jobs (the common ones in a line above); CSV has every job's full task overrides, a
    column per override key that differs, the metrics, threads, dir and error."""
    from saelab.report import markdown_table  # formats the numbers as the run reports do

    jobs = find_jobs(sweep_dir)
    cols = metric_columns(jobs, wanted)
    shared = set.intersection(*(set(j["overrides"]) for j in jobs)) if jobs else set()
    varying = [[o for o in j["overrides"] if o not in shared] for j in jobs]
    keys = list(dict.fromkeys(o.split("=", 1)[0].lstrip("+~") for v in varying for o in v))

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [
        [
            "" if j["num"] is None else j["num"],
            cell(j["status"] + (f": {j['error']}" if j["error"] else "")),
            cell(job_label(v)),
            *[j["metrics"].get(c) for c in cols],
            j["torch_threads"],
        ]
        for j, v in zip(jobs, varying)
    ]
    common = cell(job_label(o for o in jobs[0]["overrides"] if o in shared)) if jobs else ""
    done = sum(j["status"] == "ok" for j in jobs)
    md = (
        f"# saelab sweep: {sweep_dir}\n\n{done} of {len(jobs)} jobs finished with results"
        + (f"; every job has `{common}`" if common else "")
        + ".\n\n"
        + markdown_table(["job", "status", "overrides", *cols, "threads"], rows)
        + "\n"
    )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["job", "status", "overrides", *keys, *cols, "threads", "dir", "error"])
    for j, v in zip(jobs, varying):
        by_key = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] if "=" in o else "" for o in v}
        writer.writerow(
            [
                j["num"],
                j["status"],
                " ".join(j["overrides"]),
                *[by_key.get(k, "") for k in keys],
                *["" if j["metrics"].get(c) is None else j["metrics"][c] for c in cols],
                "" if j["torch_threads"] is None else j["torch_threads"],
                j["dir"],
                j["error"],
            ]
        )
    return md, buf.getvalue()
