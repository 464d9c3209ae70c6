"""Several SAEs trained in one fit on the same activation batches, evaluated and reported side by side.

The sweep of a k, a width or a loss coefficient trains SAEs that read the same activations; one fit per
SAE pays the source (the host forward with `data.cache=false`) once per SAE. This recipe trains them in
one fit (`saelab.multi.LitMultiSAE`), as dictionary_learning's `trainSAE(trainer_configs=[...])` and
SAELens's multi-SAE runner do: each SAE keeps its own model, objective, optimiser, LR schedule, dead-latent
counter and metrics (`<name>/...`), and ends with the weights its own fit would give on the same batches.

Parameters (`conf/recipe/multi.yaml`):
  saes:  {name: [Hydra override, ...]} applied on top of the experiment, composed as the compare recipe
         composes its variants (e.g. `k16: [sae.activation.k=16]`, `l1: [sae=relu, "objective/terms=[mse,l1]"]`).

What an SAE's overrides may change: `sae`, `objective`, `optim` and `lit`. Shared by all SAEs of the fit,
and refused when an SAE's config differs (naming the key): `data` (one source, built once from the
experiment's config), `trainer` (one Trainer: steps, precision, clipping value, validation) and `seed`
(the global seed; `sae.seed=N` varies one SAE's initialisation). The rest (logger, checkpoint, eval,
export, dashboards) is the experiment's for every SAE, and an SAE whose overrides set it is refused too.

Each SAE is exported to `<run>/<name>/sae` (SAELens format) and evaluated with the experiment's
`eval/metrics` (resolved in the SAE's config, so the core evaluator uses its dead window); figures go to
`<run>/<name>/`. The fit's checkpoints (`checkpoints/multi/`) hold every SAE with its optimiser and
schedule, so `resume=auto` continues all of them. The table has one row per SAE; results.json has the
same rows under `saes`. Not drawn per SAE: the density-over-training heatmap and the W&B export
artifacts of a single fit (both are keyed by the run).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from saelab import health
from saelab.checkpoint import (
    config_differences,
    is_rank_zero,
    read_checkpoint,
    remove_temporaries,
)
from saelab.checks import ConfigError, check_config
from saelab.eval.base import evaluate
from saelab.io import save_sae, source_metadata
from saelab.multi import LitMultiSAE
from saelab.recipes.compare import variant_cfg
from saelab.report import Report, summary_table
from saelab.stage import StageResult, check_export, evaluators, write_report
from saelab.train import (
    build_lit,
    build_source,
    log_summary,
    plain,
    resolve_resume,
    run_dir_of,
    run_trainer,
    wandb_scope,
)

STAGE = "multi"  # checkpoints in <run>/checkpoints/multi/, the logger's run csv/multi
SHARED = ("seed", "data", "trainer")  # one global seed, one activation source, one Trainer
PER_SAE = ("sae", "objective", "optim", "lit")
# an SAE's name is a directory (<run>/<name>/sae) and a metric prefix; not one of the run dir's own folders
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")
_TAKEN = {"checkpoints", "csv", "hydra", "host", "sae", "wandb", STAGE}


def run(cfg: DictConfig) -> dict:
    run_dir, rc = run_dir_of(cfg), cfg.recipe

    def report(stages: dict[str, StageResult]) -> Report:
        r = Report(run_dir, f"saelab multi-SAE fit: {cfg.name}", cfg.name)
        rows = {name: dict(st.eval.metrics) for name, st in stages.items()}
        columns = [c for c in rc.columns if any(c in row for row in rows.values())]
        r.add_table("Results", summary_table(rows, columns, "SAE"), terminal=True)
        for name, st in stages.items():
            r.add_metrics(st.metrics, prefix=f"{name}/")
            r.add_eval(st.eval, f"{name}/", metrics=False, tables=False, label=name)  # figures, eval data
        r.add_data("saes", rows)
        r.add_data("exports", {name: st.export for name, st in stages.items()})
        first = next(iter(stages.values()))
        r.add_text(
            "Artifacts",
            "\n".join(f"- `{name}`: `{st.export}`" for name, st in stages.items())
            + f"\n- checkpoints (all SAEs): `checkpoints/{STAGE}/`; one fit of {first.steps} steps "
            f"in {first.seconds:.1f} s",
        )
        return r.add_text("Definitions", __doc__ or "")

    stages = train_many(cfg, member_cfgs(cfg), run_dir, report=report)
    first = next(iter(stages.values()))
    return first.results if first.is_global_zero else {}


def member_cfgs(cfg: DictConfig) -> dict[str, DictConfig]:
    """{name: the experiment's config re-composed with that SAE's overrides} for each of `recipe.saes`."""
    saes = cfg.recipe.get("saes") or {}
    if not saes:
        raise ConfigError(
            "recipe.saes is empty: name each SAE with its overrides, e.g. "
            """'recipe.saes={k16: ["sae.activation.k=16"], k32: ["sae.activation.k=32"]}'."""
        )
    out = {}
    for name, overrides in saes.items():
        over = [overrides] if isinstance(overrides, str) else list(overrides or [])
        out[str(name)] = variant_cfg(cfg, [str(o) for o in over])
    return out


# ---------------------------------------------------------------------- configs
def check_members(base: DictConfig, members: Mapping[str, DictConfig]) -> None:
    """`ConfigError` naming the SAE and the key when an SAE's config cannot share the fit of `base`: a bad
    name, a `SHARED` setting (data, trainer, seed) that differs from the base config's, or an override of
    anything outside `PER_SAE` (which the fit takes from the base config)."""
    if not members:
        raise ConfigError("a multi fit needs at least one SAE: recipe.saes={name: [override, ...]}.")
    resolved, raw = _tree(base, resolve=True), _tree(base, resolve=False)
    for name, c in members.items():
        if not _NAME.fullmatch(name) or name in _TAKEN:
            raise ConfigError(
                f"SAE name {name!r}: names are folders of the run dir and metric prefixes; use letters, "
                f"digits and _ . = - (not {', '.join(sorted(_TAKEN))})."
            )
        # shared settings compared resolved; the rest as written, so that a value interpolated from a
        # per-SAE key (eval.metrics.core.dead_window_tokens: ${lit.dead_window_tokens}) is the base's
        mine = _tree(c, resolve=True)
        if differ := _differences(resolved, mine, SHARED):
            what, here, there = differ[0]
            raise ConfigError(
                f"SAE {name!r}: {what} is {here} here but {there} in the base config. The SAEs of one fit "
                f"share {', '.join(SHARED)} (sae.seed varies one SAE's initialisation): set {what} for "
                "all of them, or train this SAE in a fit of its own."
            )
        mine = _tree(c, resolve=False)
        rest = sorted(k for k in raw.keys() | mine.keys() if k not in SHARED and k not in PER_SAE)
        if differ := _differences(raw, mine, rest):
            what, here, there = differ[0]
            raise ConfigError(
                f"SAE {name!r}: {what} is {here} here but {there} in the base config; a multi fit takes "
                f"{what.split('.')[0]} from the base config for every SAE (an SAE's overrides may set "
                f"{', '.join(PER_SAE)}): set it for all of them, or train this SAE in a fit of its own."
            )


def _tree(cfg: DictConfig, resolve: bool) -> dict[str, Any]:
    return {str(k): v for k, v in OmegaConf.to_container(cfg, resolve=resolve).items()}  # type: ignore[union-attr]


def _differences(a: dict[str, Any], b: dict[str, Any], keys: Any) -> list[tuple[str, str, str]]:
    """(dotted key, value in b, value in a) for each leaf under the top-level `keys` where b differs from a."""
    out = []
    for key in keys:
        flat_a, flat_b = _flat(a.get(key, _UNSET), key), _flat(b.get(key, _UNSET), key)
        for k in sorted(flat_a.keys() | flat_b.keys()):
            if flat_a.get(k, _UNSET) != flat_b.get(k, _UNSET):
                out.append((k, _show(flat_b.get(k, _UNSET)), _show(flat_a.get(k, _UNSET))))
    return out


_UNSET: Any = object()


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= _flat(v, f"{prefix}.{k}")
        return out
    return {prefix: tree}


def _show(value: Any) -> str:
    return "unset" if value is _UNSET else repr(value)


def _check_resumed_members(path: str, members: Mapping[str, DictConfig], strict: bool) -> None:
    """The SAEs of the checkpoint at `path` are these, with these settings (`checkpoint.RESUMABLE` aside):
    refused under `strict` (resume=auto), noted otherwise (resume=<path>, the deliberate choice)."""
    stored = read_checkpoint(Path(path)).get("saelab_multi_configs")
    if not isinstance(stored, dict):
        problems = ["it records no SAE configs"]
    elif set(stored) != set(members):
        problems = [f"it trained the SAEs {sorted(stored)}, this fit {sorted(members)}"]
    else:
        problems = [f"{n}: {d}" for n, c in members.items() for d in config_differences(stored[n], c)]
    if not problems:
        return
    listed = "; ".join(problems[:6]) + (f"; {len(problems) - 6} more" if len(problems) > 6 else "")
    if strict:
        raise ValueError(
            f"resume=auto: {path} was written by a multi fit with other SAE settings ({listed}): continue it "
            "with that run's overrides, or start this run in a new run dir."
        )
    if is_rank_zero():
        print(f"saelab: resume={path}: its SAEs had other settings ({listed}); continuing under these.")


class _MemberConfigsInCheckpoint(pl.Callback):
    """Stores each SAE's resolved config (plain dicts) in every checkpoint under `saelab_multi_configs`."""

    def __init__(self, configs: dict[str, dict]) -> None:
        self.configs = configs

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["saelab_multi_configs"] = self.configs


# ---------------------------------------------------------------------- fit
@dataclass
class MultiFitResult:
    lit: LitMultiSAE
    datamodule: Any
    trainer: pl.Trainer
    logger: Any
    seconds: float

    @property
    def saes(self) -> dict[str, Any]:
        return {name: lit.sae for name, lit in self.lit.members.items()}


def fit_many(
    base: DictConfig,
    members: Mapping[str, DictConfig],
    run_dir: Path,
    stage: str = STAGE,
    datamodule: Any = None,
    saes: Mapping[str, Any] | None = None,
) -> MultiFitResult:
    """Train the SAE of each config in `members` ({name: config}) in one fit on the batches of `base`'s
    source; checkpoints go to <run_dir>/checkpoints/<stage>/. `datamodule` and `saes` ({name: SAE}) are
    built from `base.data` and each member's `sae` unless given. Logger, checkpoint interval, resume and
    seed come from `base`; see `check_members` for what the members may and may not change."""
    check_members(base, members)
    pl.seed_everything(base.seed, workers=True, verbose=False)
    ckpt_dir = run_dir / "checkpoints" / stage
    if is_rank_zero() and (removed := remove_temporaries(ckpt_dir, *(run_dir / n for n in members))):
        names = ", ".join(str(p.relative_to(run_dir)) for p in removed)
        print(f"saelab: removed the temporary files a killed run left: {names}.", flush=True)
    ckpt_path = resolve_resume(base, ckpt_dir)  # before anything is built: a refusal costs nothing
    if ckpt_path is not None:
        _check_resumed_members(ckpt_path, members, strict=base.get("resume") == "auto")
    dm = build_source(base, datamodule)
    lits = {}
    for name, c in members.items():
        sae = saes[name] if saes is not None else instantiate(c.sae)  # its seed, as its own fit builds it
        lits[name] = build_lit(c, sae)
        health.before_fit(lits[name])
    lit = LitMultiSAE(lits)
    # no dashboards: the density heatmap is keyed by the run (each SAE logs <name>/lr with its scalars)
    members_in_ckpt = _MemberConfigsInCheckpoint({name: plain(c) for name, c in members.items()})
    trainer, logger, seconds = run_trainer(
        base, run_dir, stage, lit, dm, ckpt_path, extra_callbacks=(members_in_ckpt,), dashboards_on=False
    )
    for name, member in lit.members.items():
        health.after_fit(member, dm, trainer)
        health.record(run_dir, name, member.health_warnings)
    return MultiFitResult(lit, dm, trainer, logger, seconds)


def train_many(
    base: DictConfig,
    members: Mapping[str, DictConfig],
    run_dir: Path,
    stage: str = STAGE,
    *,
    report: Callable[[dict[str, StageResult]], Report] | None = None,
) -> dict[str, StageResult]:
    """`saelab.stage.train_stage` for several SAEs in one fit: fit them (`fit_many`), export each to
    `<run>/<name>/sae` and evaluate each with its config's `eval.metrics` (the base config's evaluators,
    with the SAE's own interpolated values such as its dead window), figures in `<run>/<name>/`.

    Returns {name: StageResult}, each with `eval/<metric>`, `train/seconds` (of the whole fit) and
    `train/steps`. `report`, given the results, builds the run's report, written into the fit's W&B run.
    Under DDP, ranks other than 0 export and evaluate nothing (`is_global_zero` False).
    """
    check_config(base)
    for c in members.values():
        check_config(c)
    check_members(base, members)
    saes = {name: instantiate(c.sae) for name, c in members.items()}
    export = bool(base.get("export", True))
    if export:
        for name, sae in saes.items():
            try:
                check_export(sae)  # an SAE that cannot be exported stops now, not after the fit
            except ConfigError as e:
                raise ConfigError(f"SAE {name!r}: {e}") from e
    res = fit_many(base, members, run_dir, stage, saes=saes)
    dm, trainer = res.datamodule, res.trainer
    steps = int(trainer.global_step)
    out = {
        name: StageResult(name, sae, dm, seconds=res.seconds, steps=steps) for name, sae in res.saes.items()
    }
    with wandb_scope(res.logger):
        if export and trainer.is_global_zero:
            # the exports read the host's raw activations: the source's input scale is folded into them
            scale = float(getattr(dm, "act_scale", 1.0) or 1.0)
            for name, st in out.items():
                meta = {"saelab_run": base.name, "stage": name, "fit": stage, **source_metadata(dm)}
                st.export = save_sae(st.sae, run_dir / name / "sae", meta, act_scale=scale)
        trainer.strategy.barrier("saelab-export")
        if not trainer.is_global_zero:
            for st in out.values():
                st.is_global_zero = False
            return out
        for i, (name, st) in enumerate(out.items()):
            chosen = evaluators(OmegaConf.select(members[name], "eval.metrics"))
            st.eval = evaluate(st.sae, dm, chosen, run_dir / name, quiet=i > 0)
            st.metrics = {f"eval/{k}": v for k, v in st.eval.metrics.items()}
            st.metrics |= {"train/seconds": res.seconds, "train/steps": steps}
        log_summary(res.logger, {f"{n}/{k}": v for n, st in out.items() for k, v in st.metrics.items()})
        if report is not None:
            results = write_report(report(out), res.logger)
            for st in out.values():
                st.results = results
    return out
