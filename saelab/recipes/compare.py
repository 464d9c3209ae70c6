"""Train several SAE variants on the same activations, over a grid of settings, and compare them.

Used for OrtSAE (Korznikov et al. 2025, arXiv:2509.22033: BatchTopK vs BatchTopK + the chunked
orthogonality term) and Matryoshka SAEs (Bussmann et al. 2025, arXiv:2503.17547: nested-prefix losses)
against BatchTopK, on the synthetic source (`compare_synthetic`) and on SmolLM2 text (`ortsae_text`).

Parameters (`conf/recipe/compare.yaml`):
  variants:  {variant: [Hydra override, ...]} applied on top of the experiment
             (e.g. `objective/terms=[mse,auxk,ortho]`);
  grid:      {cell: [override, ...]}, e.g. one cell per k (the L0 the variants are matched at); every
             variant is trained in every cell, as stage `<variant>_<cell>` (just `<variant>` without a grid);
  eval_sets: {set: {corpus: <corpus config>, tokens: N}}: more held-out text each SAE is evaluated on with
             `eval_set_metrics` (metrics reported as `<set>/<metric>`);
  pairwise:  unique features between the variants of each cell (`unique_vs_<other>`, OrtSAE §2.3).

Every stage sees the same batches in the same order (one seed, one activation cache). The evaluators of
each stage are `eval/metrics` (explained variance, L0, MeanCosSim, absorption, composition, ...). The step
time of each variant is its fit's seconds per step relative to the first variant of its cell (the same data
loading, so the ratio understates the loss terms' cost; `python -m saelab.bench --sections variants`
times the bare steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from saelab.analysis import plots
from saelab.eval.geometry import unique_features
from saelab.report import Report, summary_table
from saelab.stage import StageResult, evaluate_stage, finish, text_data, train_stage
from saelab.train import apply_debug, run_dir_of


def variant_cfg(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The experiment's config re-composed with the variant's overrides appended."""
    base = (
        list(HydraConfig.get().overrides.task)
        if HydraConfig.initialized()
        else list(cfg.recipe.base_overrides)
    )
    return apply_debug(compose(config_name="config", overrides=[*base, *overrides]))


def stage_names(rc: DictConfig) -> dict[str, tuple[str, str, list[str]]]:
    """{stage: (variant, cell, overrides)} for every variant in every grid cell (cell "" without a grid)."""
    grid = dict(rc.get("grid") or {}) or {"": []}
    out = {}
    for variant, v_over in rc.variants.items():
        for cell, c_over in grid.items():
            name = f"{variant}_{cell}" if cell else str(variant)
            out[name] = (str(variant), str(cell), [*c_over, *v_over])
    return out


def train_variants(cfg: DictConfig, run_dir: Path) -> dict[str, tuple[str, str, StageResult]]:
    """Train every (variant, cell) stage → {stage: (variant, cell, StageResult)}; {} on DDP ranks > 0.

    Stages whose data config is the same share one datamodule (one host in memory, one activation cache,
    and the spliced evaluator's clean reference computed once for all of them).
    """
    out = {}
    sources: dict[str, Any] = {}
    for name, (variant, cell, overrides) in stage_names(cfg.recipe).items():
        c = variant_cfg(cfg, overrides)
        key = OmegaConf.to_yaml(c.data)
        if key not in sources:
            sources[key] = instantiate(c.data)
            # build the activation cache now, so no stage's fit time (the step-time ratios) includes it
            for loader in ("train_dataloader", "val_dataloader"):
                getattr(sources[key], loader, lambda: None)()
        stage = train_stage(c, run_dir, name, datamodule=sources[key])
        if stage.is_global_zero:  # under DDP every rank trains every variant; only rank 0 reports
            out[name] = (variant, cell, stage)
    return out


def eval_sources(cfg: DictConfig, host: Any = None) -> dict:
    """The recipe's extra held-out sets as activation sources: the experiment's data config with its
    validation corpus replaced by the set's corpus, on `host` (default: a new one from `cfg.data.host`)."""
    sets = cfg.recipe.get("eval_sets") or {}
    if not sets:
        return {}
    host = host if host is not None else instantiate(cfg.data.host)
    corpus = instantiate(cfg.data.corpus)
    return {
        name: text_data(cfg, corpus, instantiate(spec.corpus), host=host, val_tokens=int(spec.tokens))
        for name, spec in sets.items()
    }


def pairwise_unique(
    stages: Mapping[str, tuple[str, str, StageResult]], threshold: float
) -> dict[str, dict[str, float]]:
    """{stage: {unique_vs_<variant>: share of its latents unique w.r.t. that variant in the same cell}}."""
    out: dict[str, dict[str, float]] = {n: {} for n in stages}
    for a, (va, ca, sa) in stages.items():
        for b, (vb, cb, sb) in stages.items():
            if a < b and ca == cb:
                u = unique_features(sa.sae.W_dec, sb.sae.W_dec, threshold)
                out[a][f"unique_vs_{vb}"] = u["unique_a"]
                out[b][f"unique_vs_{va}"] = u["unique_b"]
    return out


def step_time_ratios(stages: Mapping[str, tuple[str, str, StageResult]]) -> dict[str, float]:
    """Seconds per step of each stage over the first variant's in the same cell."""
    first: dict[str, float] = {}
    out = {}
    for name, (_, cell, st) in stages.items():
        per = st.seconds / max(1, st.steps)
        first.setdefault(cell, per)
        out[name] = per / first[cell]
    return out


def run(cfg: DictConfig) -> dict:
    run_dir, rc = run_dir_of(cfg), cfg.recipe
    stages = train_variants(cfg, run_dir)
    if not stages:
        return {}
    report = Report(run_dir, f"saelab comparison: {cfg.name}", cfg.name)
    rows = {name: {**st.eval.metrics, "train_seconds": st.seconds} for name, (_, _, st) in stages.items()}
    for name, (_, _, st) in stages.items():
        report.add_metrics(st.metrics, prefix=f"{name}/").add_eval(
            st.eval, f"{name}/", metrics=False, tables=False, figures=False
        )

    # the same SAEs on more held-out text
    first = next(iter(stages.values()))[2].datamodule
    sources = eval_sources(cfg, getattr(first, "host", None))
    if sources:
        saes = {name: st.sae for name, (_, _, st) in stages.items()}
        per_set = evaluate_stage(cfg, run_dir, "eval_sets", saes, sources, rc.eval_set_metrics)
        for set_name, per in per_set.items():
            for name, r in per.items():
                rows[name].update({f"{set_name}/{k}": v for k, v in r.metrics.items()})
                report.add_metrics(r.metrics, prefix=f"{name}/{set_name}/")
    if rc.get("pairwise", False) and len(rc.variants) > 1:
        for name, u in pairwise_unique(stages, float(rc.unique_threshold)).items():
            rows[name].update(u)
            report.add_metrics(u, prefix=f"{name}/")
    for name, ratio in step_time_ratios(stages).items():
        rows[name]["step_time_x"] = ratio
        report.add_metrics({"step_time_x": ratio}, prefix=f"{name}/")

    columns = [c for c in rc.columns if any(c in r for r in rows.values())]
    report.add_table("Results", summary_table(rows, columns, "SAE"), terminal=True)
    _figures(report, run_dir, rc, stages, rows)
    report.add_text("Definitions", __doc__ or "")
    report.add_text("Artifacts", "\n".join(f"- `{n}`: `{st.export}`" for n, (_, _, st) in stages.items()))
    report.add_data("variants", rows)
    return finish(cfg, report)


def _figures(report: Report, run_dir: Path, rc: DictConfig, stages: Mapping, rows: Mapping) -> None:
    plot = [c for c in rc.plot if any(c in r for r in rows.values())]
    if plot:
        fig = plots.bars(
            plot,
            {n: [_num(r.get(k)) for k in plot] for n, r in rows.items()},
            run_dir / "compare.png",
            "value",
            "Variants on the same activations",
            xlabel="metric",
        )
        report.add_figure("comparison", fig)
    by_variant: dict[str, list[str]] = {}
    for name, (variant, _, _) in stages.items():
        by_variant.setdefault(variant, []).append(name)
    if rc.get("grid"):  # each metric against the L0 the variants reached, one line per variant
        for metric in rc.get("vs_l0", []):
            pts = {
                v: _sorted_xy([(rows[n].get("l0"), rows[n].get(metric)) for n in names])
                for v, names in by_variant.items()
            }
            pts = {v: p for v, p in pts.items() if p[0]}
            if pts:
                path = plots.scatter(pts, run_dir / f"{metric}_vs_l0.png", "L0", metric, f"{metric} vs L0")
                report.add_figure(f"{metric} vs L0", path)
    hists = {n: st.eval.data["max_cos"] for n, (_, _, st) in stages.items() if "max_cos" in st.eval.data}
    if hists:
        path = plots.overlaid_histograms(
            hists,
            run_dir / "decoder_cos.png",
            "max cosine to another decoder row",
            "Decoder cosine similarity",
        )
        report.add_figure("decoder cosine histogram", path)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else 0.0


def _sorted_xy(pairs) -> tuple[list[float], list[float]]:
    ok = sorted(
        (float(x), float(y)) for x, y in pairs if isinstance(x, (int, float)) and isinstance(y, (int, float))
    )
    return [x for x, _ in ok], [y for _, y in ok]
