"""SAE Boost (Koriagin et al. 2025, arXiv:2507.12990): a frozen general SAE plus one small residual SAE per domain.

A residual SAE reads the activation x and reconstructs the frozen base's error e = x − x̂_base(x) with no
decoder bias, ê(x) = BatchTopK(x W_enc + b_enc) W_dec, trained on MSE(e, ê) + AuxK. Boosted, the output is
x̂ = x̂_base(x) + ê(x); residuals of several domains add up, x̂ = x̂_base(x) + Σ_d ê_d(x). A boosted SAE exports
as one stitched JumpReLU SAE (the base's dictionary followed by the residuals').

Stages (parameters in `conf/recipe/boost.yaml`; each trained SAE is one Lightning fit / W&B run):
  1. `base`:         a BatchTopK SAE on general text (`cfg.data`), or the export `recipe.base_export` (no
                     training). The paper's base is trained on general web text that holds little of its target
                     domains; `general` holds the PubMedQA abstracts, so `boost_domain` trains the base on
                     `general_nobio` (`general` without them): the biomedical domain must be new to the base, or
                     its residual has little to add. The physics documents stay hidden in the pool, as in
                     `general`, because the physics domain is retrieved from it.
  2. domains:        each `recipe.domains` entry's training text, `train: null` meaning the documents retrieved
                     from the general pool by dense retrieval (`saelab.corpora.selection.select_methods`, the ssae
                     recipe's selection): physics; else its corpus: bio = PubMedQA split train. `test` is held out.
  3. `res_<domain>`: one residual SAE per domain (`recipe.residual.sae`, `sae=residual`) on the frozen base
                     export, trained on `domain_train_tokens` of the domain's text; its export is `base+<domain>`.
                     Width and k: the paper's optimum is 1024 latents with k=5 beside a far wider base; here they
                     scale with the base, 1/8 of its width and k (base 2048 latents, k=32 → 256 latents, k=4).
  4. baselines:      `finetune_<domain>`: the base fine-tuned on `recipe.finetune.domain` (the SSAE route);
                     `scratch_wide`: a BatchTopK SAE of the combined width (base + every residual) and k (base k +
                     Σ residual k) from random init, on the text the other stages read (the base's general tokens
                     and each domain's training tokens, `concat`).
  5. `base+both`:    base + every residual without training: the stitched base+<first domain> export is the
                     frozen base of the next residual (`add_residual`), exported stitched.
  6. evaluation:     every SAE read back from its SAELens export, on held-out general text (`data.val_corpus`)
                     and on each domain's held-out text: L0, explained variance (`core`), spliced CE and
                     ce_loss_score (`spliced`), and how many residual latents fire (`fired_latents`).

Writes results.json, report.md, `ev.png` and `ce_loss_score.png` (each row minus the base, per held-out
set), and prints the comparison table.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from saelab.analysis import plots
from saelab.corpora.selection import select_methods
from saelab.corpora.text import Corpus, concat
from saelab.eval.base import EvalResult, Table, batch_acts
from saelab.io import load_sae, save_sae
from saelab.report import Report, summary_table
from saelab.sae import SAE, ResidualSAE
from saelab.stage import StageResult, evaluate_stage, finetune_cfg, finish, text_data, train_stage
from saelab.train import plain, run_dir_of

COMBINED = "base+both"  # the row of the base plus every domain's residual


def run(cfg: DictConfig) -> dict:
    run_dir, rc = run_dir_of(cfg), cfg.recipe
    corpus, val_corpus = instantiate(cfg.data.corpus), instantiate(cfg.data.val_corpus)
    domains = list(rc.domains)
    if len(domains) < 2:
        raise ValueError(f"the boost recipe needs two or more recipe.domains for {COMBINED}, got {domains}.")
    stages: dict[str, StageResult] = {}

    # 1. the base SAE on general text (or an existing export), frozen from here on
    base_export = Path(rc.base_export) if rc.base_export else run_dir / "base" / "sae"
    if not rc.base_export:
        general = text_data(cfg, corpus, val_corpus)
        stages["base"] = train_stage(cfg, run_dir, "base", datamodule=general, export_dir=base_export)

    # 2. each domain's training and held-out text; `train: null` = dense retrieval from the general pool
    hidden = instantiate(rc.hidden_corpus).ids if rc.hidden_corpus else ()
    seed, sel = instantiate(rc.seed_corpus), plain(rc.selection)
    chosen, selection = select_methods(seed, corpus, relevant_ids=hidden, out_dir=run_dir / "select", **sel)
    train = {d: instantiate(s.train) if s.train else chosen[sel["methods"][0]] for d, s in rc.domains.items()}
    test = {d: instantiate(s.test) for d, s in rc.domains.items()}
    tokens, domain_tokens = int(rc.domain_train_tokens), int(rc.eval.domain_tokens)

    def domain_data(d: str) -> Any:
        return text_data(cfg, train[d], test[d], train_tokens=tokens, val_tokens=domain_tokens)

    # 3. one residual SAE per domain on the frozen base (its export is stitched: base+<domain>)
    rs = rc.residual
    res = {"sae": rs.sae, "sae.base.path": str(base_export), "trainer.max_steps": rs.max_steps}
    res_cfg = stage_cfg(cfg, res | {"optim.optimizer.lr": rs.lr})
    for d in domains:
        stages[f"res_{d}"] = train_stage(res_cfg, run_dir, f"res_{d}", datamodule=domain_data(d))
    residuals = {d: stages[f"res_{d}"].sae for d in domains}

    # 4. baselines: the base fine-tuned on one domain (SSAE), one SAE as wide as base + residuals from scratch
    fd, base = rc.finetune.domain, load_sae(base_export)
    ft_cfg = finetune_cfg(cfg, base_export, cfg.objective.terms, rc.finetune.max_steps, rc.finetune.lr)
    stages[f"finetune_{fd}"] = train_stage(ft_cfg, run_dir, f"finetune_{fd}", datamodule=domain_data(fd))
    width = base.d_sae + sum(r.d_sae for r in residuals.values())
    k = rc.scratch.k or cfg.sae.activation.k + sum(r.activation.k for r in residuals.values())
    wide = {"sae.d_sae": width, "sae.activation.k": k, "sae.init_from": None}
    wide_cfg = stage_cfg(cfg, wide | {"trainer.max_steps": rc.scratch.max_steps})
    mixed = _scratch_data(cfg, corpus, val_corpus, [train[d] for d in domains], tokens)
    stages["scratch_wide"] = train_stage(wide_cfg, run_dir, "scratch_wide", datamodule=mixed)
    if not stages[f"res_{domains[0]}"].is_global_zero:  # under DDP only rank 0 builds, evaluates and reports
        return {}

    # 5. base + every residual, without training (exported stitched)
    exports = {n: st.export for n, st in stages.items()}
    both = exports[f"res_{domains[0]}"]
    for d in domains[1:]:
        both = add_residual(both, residuals[d].residual, run_dir / COMBINED / "sae", {"saelab_run": cfg.name})

    # 6. every SAE as exported, on held-out general text and on each domain's held-out text
    rows = {"base": base_export, **{f"base+{d}": exports[f"res_{d}"] for d in domains}, COMBINED: both}
    rows |= {n: exports[n] for n in (f"finetune_{fd}", "scratch_wide")}
    saes = {n: load_sae(p) for n, p in rows.items()}
    sources = {
        "general": text_data(cfg, corpus, val_corpus, val_tokens=rc.eval.general_tokens),
        **{d: text_data(cfg, train[d], test[d], val_tokens=domain_tokens) for d in domains},
    }
    ev = evaluate_stage(cfg, run_dir, "eval", saes, sources, rc.eval.metrics)
    blocks = boosted_blocks(base.d_sae, {d: r.d_sae for d, r in residuals.items()}, COMBINED)
    fired = {n: {s: fired_latents(ev[s][n].data["density"], blocks.get(n, {})) for s in ev} for n in saes}
    x = batch_acts(next(iter(sources["general"].val_dataloader())))
    err = composition_error(saes[COMBINED], base, [r.residual for r in residuals.values()], x)

    # report
    report = Report(run_dir, f"SAE Boost: {cfg.name}", cfg.name)
    for s, per in ev.items():
        for n, r in per.items():
            report.add_eval(r, f"{n}/{s}/", tables=False, figures=False)
    held_out = ", ".join(f"{s} = `{src.val_corpus.name}`" for s, src in sources.items())
    note = f"{_NOTE} Held-out sets: {held_out}."
    report.add_table("Comparison", comparison(ev, fired, saes), note=note, terminal=True)
    report.add_table("Residual latents that fire", fired_table(fired, blocks, residuals), terminal=True)
    for metric, label in (("explained_variance", "explained variance"), ("ce_loss_score", "ce_loss_score")):
        values = {n: {s: ev[s][n].metrics.get(metric, math.nan) for s in ev} for n in saes}
        png = delta_bars(values, "base", run_dir / f"{_PNG[metric]}.png", label)
        report.add_figure(f"{label} minus the base's, per held-out set", png, heading="Figures")
    report.add_text("Rows", _rows_text(saes, stages, fd, k, err))
    report.add_text("Artifacts", "\n".join(f"- `{n}`: `{p}`" for n, p in rows.items()))
    report.add_metrics(
        {f"{n}/{s}/residual_fired": sum(f.values()) for n, per in fired.items() for s, f in per.items() if f}
    )
    report.add_metrics({f"{COMBINED}/composition_rel_err": err})
    report.add_data("selection", selection).add_data("residual_fired", fired).add_data(
        "residual_blocks", blocks
    )
    report.add_data("exports", rows).add_data("scratch_corpus", mixed.corpus.provenance)
    report.add_data("stages", {n: _stage_record(st) for n, st in stages.items()})
    return finish(cfg, report)


def stage_cfg(cfg: DictConfig, changes: Mapping[str, Any]) -> DictConfig:
    """A copy of the experiment's config with `changes` ({dotted key: value}, applied in order) set."""
    c = copy.deepcopy(cfg)
    with open_dict(c):
        for key, value in changes.items():
            OmegaConf.update(c, key, value, merge=False)
    return c


def head(corpus: Corpus, tokenizer: Any, tokens: int) -> Corpus:
    """The first documents of `corpus` that hold `tokens` tokens: what a datamodule with that token budget
    reads (`saelab.data.text.pack` joins the documents with one separator token each)."""
    n = 0
    for i, text in enumerate(corpus.texts):
        n += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if n >= tokens:
            return corpus.subset(range(i + 1))
    return corpus


def _scratch_data(
    cfg: DictConfig, corpus: Corpus, val_corpus: Corpus, domains: list[Corpus], tokens: int
) -> Any:
    """The text the base and the domain stages read (`head` of each, `concat`, repeats once), in a datamodule
    whose token budget holds all of it: the general training tokens plus `tokens` of each domain."""
    tok, general = instantiate(cfg.data.host).tokenizer, int(cfg.data.train_tokens)
    parts = [head(corpus, tok, general), *(head(c, tok, tokens) for c in domains)]
    budget = general + len(domains) * tokens
    return text_data(cfg, concat(parts, "general+domains"), val_corpus, train_tokens=budget)


def add_residual(stitched: Path | None, residual: SAE, out: Path, metadata: dict | None = None) -> Path:
    """Export, stitched to `out`, the SAE at `stitched` plus `residual`, without training: its output is
    stitched(x) + residual(x), so with `stitched` = base + res_1 it is base(x) + res_1(x) + residual(x)."""
    if stitched is None:
        raise ValueError("adding a residual needs the stitched export it adds to: set export=true.")
    combined = ResidualSAE(load_sae(stitched), copy.deepcopy(residual))  # ResidualSAE adopts its residual
    return save_sae(combined, out, metadata={"stage": COMBINED, **(metadata or {})})


def boosted_blocks(
    d_base: int, widths: Mapping[str, int], combined: str
) -> dict[str, dict[str, tuple[int, int]]]:
    """{row: {domain: (start, stop)}}: where each residual's latents sit in the stitched dictionaries of
    `base+<domain>` (after the base's `d_base` latents) and of `combined` (all residuals, in order)."""
    out: dict[str, dict[str, tuple[int, int]]] = {
        f"base+{d}": {d: (d_base, d_base + w)} for d, w in widths.items()
    }
    out[combined], start = {}, d_base
    for d, w in widths.items():
        out[combined][d], start = (start, start + w), start + w
    return out


def fired_latents(
    density: Sequence[float] | torch.Tensor, blocks: Mapping[str, tuple[int, int]]
) -> dict[str, int]:
    """{block: latents of that block that fire at least once on the evaluated tokens}, from the `core`
    evaluator's per-latent firing density (the fraction of tokens whose code is non-zero)."""
    fires = torch.as_tensor(density) > 0
    return {b: int(fires[start:stop].sum()) for b, (start, stop) in blocks.items()}


@torch.no_grad()
def composition_error(combined: Any, base: Any, residuals: Sequence[Any], x: torch.Tensor) -> float:
    """max |combined(x) − p(x)| / max |p(x)| with p(x) = base(x) + Σ_r r(x), over the batch: how exactly a
    stitched SAE adds up its parts (every module is put in eval mode: BatchTopK applies its threshold)."""
    for m in (combined, base, *residuals):
        m.eval()
    parts = base(x).x_hat + sum(r(x).x_hat for r in residuals)
    return float((combined(x).x_hat - parts).abs().max() / parts.abs().max().clamp_min(1e-12))


def delta_bars(values: Mapping[str, Mapping[str, float]], ref: str, path: Path, label: str) -> Path:
    """Grouped bars of value − value of row `ref`, one group per other row, one bar per held-out set
    (`values` = {row: {set: value}}): the differences are a few hundredths, invisible on a 0–1 axis."""
    sets = list(values[ref])
    bars = {s: [values[n][s] - values[ref][s] for n in values if n != ref] for s in sets}
    groups = [n for n in values if n != ref]
    return plots.bars(groups, bars, path, f"{label} − {ref}", f"{label} relative to {ref}", xlabel="SAE")


def comparison(
    ev: Mapping[str, Mapping[str, EvalResult]],
    fired: Mapping[str, Mapping[str, dict]],
    saes: Mapping[str, Any],
) -> Table:
    """One row per SAE (each metric on each held-out set), then the clean model (CE of the unmodified host)."""
    sets, rows = list(ev), {}
    for n, sae in saes.items():
        row: dict[str, Any] = {"d_sae": sae.d_sae}
        for label, key in _METRICS.items():
            row |= {f"{label} {s}": ev[s][n].metrics.get(key, math.nan) for s in sets}
        # blank where the row has no residual latents
        rows[n] = row | {
            f"res. latents fired {s}": sum(f.values()) if (f := fired[n][s]) else None for s in sets
        }
    first = next(iter(saes))
    rows["(clean model)"] = {f"CE {s}": ev[s][first].metrics.get("ce_clean") for s in sets}
    rows["(clean model)"] |= {f"ce_loss_score {s}": 1.0 for s in sets}
    return summary_table(rows, list(rows[first]), "SAE")


def fired_table(
    fired: Mapping[str, Mapping[str, dict]], blocks: Mapping[str, dict], residuals: Mapping[str, Any]
) -> Table:
    """Per boosted row: how many latents of each domain's residual fire on each held-out set."""
    sets = list(next(iter(fired.values())))
    col = {(d, s): f"{d} residual ({r.d_sae}) on {s}" for d, r in residuals.items() for s in sets}
    rows = {n: {col[d, s]: fired[n][s][d] for d in b for s in sets} for n, b in blocks.items()}
    return summary_table(rows, list(col.values()), "SAE")


_PNG = {"explained_variance": "ev", "ce_loss_score": "ce_loss_score"}
_METRICS = {"EV": "explained_variance", "CE": "ce_sae", "ce_loss_score": "ce_loss_score", "L0": "l0"}
_NOTE = (
    "EV: explained variance; CE: next-token loss with the SAE spliced in at the hook; L0: active latents per "
    "token (base + residual latents for the stitched rows); res. latents fired: distinct residual latents "
    "that fire at least once on that held-out set (blank: no residuals)."
)


def _stage_record(st: StageResult) -> dict:
    """Seconds, steps, export, and the training tokens the stage harvested (a text may hold less than the
    budget)."""
    tokens = st.datamodule.store("train").n_tokens if hasattr(st.datamodule, "store") else None
    return {"seconds": st.seconds, "steps": st.steps, "export": st.export, "train_tokens": tokens}


def _rows_text(
    saes: Mapping[str, Any], stages: Mapping[str, StageResult], fd: str, k: int, err: float
) -> str:
    res = {n.removeprefix("res_"): st for n, st in stages.items() if n.startswith("res_")}
    parts = ", ".join(f"`res_{d}` ({st.sae.d_sae} latents)" for d, st in res.items())
    lines = [f"- `base`: the general SAE ({saes['base'].d_sae} latents), frozen."]
    lines += [
        f"- `base+{d}`: `base` + `res_{d}`, trained on {_stage_record(st)['train_tokens']} tokens of the {d} "
        "training text (stitched)."
        for d, st in res.items()
    ]
    lines += [
        f"- `{COMBINED}`: `base` + {parts}, no training: the stitched `base+{next(iter(res))}` export as the "
        f"frozen base of the other residuals; it reproduces base(x) + Σ residual(x) to a relative {err:.2g} "
        "(max abs error over one held-out general batch / largest output).",
        f"- `finetune_{fd}`: `base` fine-tuned on the {fd} training text.",
        f"- `scratch_wide`: {saes['scratch_wide'].d_sae} latents, k={k}, from random init on the base's general "
        f"text plus every domain's training text ({_stage_record(stages['scratch_wide'])['train_tokens']} tokens).",
    ]
    return "\n".join(lines)
