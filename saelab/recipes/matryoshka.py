"""Matryoshka SAEs on text: nested dictionaries measured prefix by prefix, and their feature hierarchy.

Bussmann, Nabeshima, Karvonen, Nanda 2025 (arXiv:2503.17547) with fixed groups, and Nabeshima 2024 with
prefix lengths redrawn each step from a truncated Pareto, against BatchTopK. Stages:
  1. every variant of `recipe.variants` trained on the same activations (the `compare` recipe's
     `train_variants`, so the comparison table, MeanCosSim, absorption and the rest come with it);
  2. per prefix size m (`recipe.prefix_fractions` of d_sae), the sub-SAE of the first m latents
     (`saelab.eval.base.prefix`, which for threshold activations reconstructs exactly the Matryoshka x̂_m)
     evaluated with `recipe.prefix_metrics` (explained variance, absorption): a Matryoshka SAE's prefixes
     should reconstruct on their own, BatchTopK's arbitrary prefixes should not;
  3. the hierarchy (`saelab.analysis.hierarchy`): for a seeded sample of live latents of the first group,
     the later latents whose decoder rows are closest and that co-fire with them, shown with their
     top-activating tokens (parent/child examples);
  4. with `recipe.interpret` (experiment `matryoshka_autointerp`): auto-interpretation scores per group, a
     steering sweep on the best-explained latents and a feature browser per variant
     (`saelab.recipes.interpret`), as the radiology-LLM Matryoshka study reports them.
"""

from __future__ import annotations

from omegaconf import DictConfig

from saelab.analysis import hierarchy, plots
from saelab.eval.base import Table, evaluate, prefix
from saelab.recipes.compare import train_variants
from saelab.recipes.interpret import interpret_variant
from saelab.report import Report, summary_table
from saelab.stage import evaluators, finish
from saelab.train import run_dir_of


def prefix_sizes(d_sae: int, fractions) -> list[int]:
    """Cumulative prefix sizes from group fractions: [1/16, 1/16, 1/8, ...] → [d/16, d/8, d/4, ...]."""
    sizes, total = [], 0.0
    for f in fractions:
        total += float(f)
        sizes.append(max(1, min(d_sae, round(total * d_sae))))
    return sorted(set(sizes))


def run(cfg: DictConfig) -> dict:
    run_dir, rc = run_dir_of(cfg), cfg.recipe
    stages = train_variants(cfg, run_dir)
    if not stages:
        return {}
    report = Report(run_dir, f"Matryoshka SAEs: {cfg.name}", cfg.name)
    rows = {name: {**st.eval.metrics} for name, (_, _, st) in stages.items()}
    for name, (_, _, st) in stages.items():
        report.add_metrics(st.metrics, prefix=f"{name}/")
    report.add_table(
        "Results",
        summary_table(rows, [c for c in rc.columns if any(c in r for r in rows.values())], "SAE"),
        terminal=True,
    )

    # 2. every prefix of every SAE, as an SAE of its own
    chosen = evaluators(rc.prefix_metrics)
    per_prefix: dict[str, dict[int, dict]] = {}
    for name, (_, _, st) in stages.items():
        for m in prefix_sizes(st.sae.d_sae, rc.prefix_fractions):
            r = evaluate(prefix(st.sae, m), st.datamodule, chosen, run_dir / name / f"prefix_{m}", quiet=True)
            per_prefix.setdefault(name, {})[m] = r.metrics
            report.add_metrics(r.metrics, prefix=f"{name}/prefix_{m}/")
    sizes = sorted({m for v in per_prefix.values() for m in v})
    for metric in rc.prefix_columns:
        headers = ["SAE", *[f"m={m}" for m in sizes]]
        trows = [[n, *[v.get(m, {}).get(metric, "") for m in sizes]] for n, v in per_prefix.items()]
        report.add_table(f"{metric} per prefix size", Table(headers, trows), terminal=True)
        pts = {
            n: ([float(m) for m in v], [float(v[m].get(metric, float("nan"))) for m in v])
            for n, v in per_prefix.items()
        }
        fig = plots.scatter(
            pts,
            run_dir / f"prefix_{metric}.png",
            "prefix size (latents)",
            metric,
            f"{metric} per prefix size",
        )
        report.add_figure(f"{metric} per prefix size", fig)
    report.add_data("per_prefix", per_prefix)

    # 3. parents in the first group, children in the later groups
    h = rc.hierarchy
    examples = {}
    for name, (variant, _, st) in stages.items():
        if variant not in h.variants:
            continue
        examples[name] = _hierarchy(st, h, report, name)
    report.add_data("hierarchy", examples)

    # 4. auto-interpretation per group, steering and the feature browser
    ic = rc.get("interpret")
    if ic:
        found = {}
        for name, (variant, _, st) in stages.items():
            if variant in ic.variants:
                bounds = prefix_sizes(st.sae.d_sae, rc.prefix_fractions)
                found[name] = interpret_variant(st, name, bounds, ic, report, run_dir / name)
        report.add_data("interpret", found)
    report.add_data("variants", rows)
    report.add_text("Definitions", (__doc__ or "") + "\n\n" + (hierarchy.__doc__ or ""))
    report.add_text("Artifacts", "\n".join(f"- `{n}`: `{st.export}`" for n, (_, _, st) in stages.items()))
    return finish(cfg, report)


def _hierarchy(st, h: DictConfig, report: Report, name: str) -> list[dict]:
    sae, dm = st.sae, st.datamodule
    first = prefix_sizes(sae.d_sae, h.first_group)[0]
    codes, ids = hierarchy.collect_codes(
        sae, dm.val_dataloader(), int(h.tokens), float(getattr(dm, "act_scale", 1.0) or 1.0)
    )
    tok = getattr(getattr(dm, "host", None), "tokenizer", None)
    decode = (lambda t: tok.decode([t]).replace("\n", "\\n")) if tok is not None else str
    parents = hierarchy.sample_parents(codes, first, int(h.n_parents), int(h.seed))
    found = hierarchy.children(
        codes, sae.W_dec, parents, range(first, sae.d_sae), int(h.n_children), float(h.min_cofire)
    )
    rows = []
    for entry in found:
        p = entry["parent"]
        entry["tokens"] = hierarchy.top_tokens(codes, ids, p, decode, int(h.n_tokens))
        for c in entry["children"]:
            c["tokens"] = hierarchy.top_tokens(codes, ids, c["latent"], decode, int(h.n_tokens))
        rows.append([f"{p}", _quote(entry["tokens"]), "", "", "", ""])
        for c in entry["children"]:
            rows.append(["", "", c["latent"], c["cos"], c["cofire"], _quote(c["tokens"])])
    headers = [
        "parent (group 1)",
        "parent top tokens",
        "child",
        "cos(d_p, d_c)",
        "P(parent fires, given child)",
        "child top tokens",
    ]
    report.add_table(f"Feature hierarchy: {name}", Table(headers, rows))
    return found


def _quote(tokens: list[str]) -> str:
    return " ".join(f"`{t.strip() or repr(t)}`" for t in tokens)
