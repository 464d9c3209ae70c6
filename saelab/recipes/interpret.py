"""Interpret trained variants as the radiology-LLM Matryoshka study does (methods.md §4.2–4.3).

For each chosen variant: feature records over held-out text (saved in `<run>/<variant>/features/`, with
the logit lens of the latents shown), auto-interpretation of `per_group` latents drawn from each nested
group (`saelab.eval.autointerp`; scores averaged per group by `saelab.analysis.groups`), a steering sweep
on the `steer.n_latents` latents whose explanations scored best (keywords from the tokens they fire on;
`saelab.analysis.steering`), and the static feature browser (`<run>/<variant>/browser/index.html`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from saelab.analysis import groups
from saelab.analysis.browser import write_browser
from saelab.analysis.features import collect_feature_records
from saelab.analysis.lens import logit_lens
from saelab.analysis.steering import steering_sweep
from saelab.eval.base import Table
from saelab.files import atomic_write_text
from saelab.report import Report
from saelab.train import plain


def interpret_variant(
    st: Any, name: str, bounds: list[int], ic: DictConfig, report: Report, out: Path
) -> dict:
    """Records, per-group autointerp, steering and the browser of one trained variant (module docstring)."""
    sae, dm = st.sae, st.datamodule
    host = dm.host
    tok = host.tokenizer
    decode = lambda t: tok.decode([int(t)])  # noqa: E731
    ai = instantiate(ic.autointerp)  # settings of the records come from the evaluator's own
    rec = collect_feature_records(
        sae, dm, split=ai.split, n_tokens=ai.tokens, top_k=ai.top_k, n_quantiles=ai.n_quantiles,
        per_quantile=ai.per_quantile, reservoir=max(ai.reservoir, ai.n_quantiles), window=tuple(ai.window),
        seed=ai.seed,
    )  # fmt: skip
    rec.save(out, decode=decode)

    # auto-interpretation of latents drawn from every group
    chosen = groups.latents_per_group(rec, bounds, int(ic.per_group), int(ic.seed), int(ai.min_examples) * 2)
    ai.latents = [j for g in sorted(chosen) for j in chosen[g]]
    res = ai(sae, dm, out)
    rows = res.data["autointerp"]["latents"]
    scores = [
        k
        for k in ("detection", "detection_auroc", "fuzzing", "fuzzing_auroc", "embedding")
        if rows and k in rows[0]
    ]
    (headers, trows), means = groups.scores_by_group(rows, bounds, scores)
    report.add_table(f"Auto-interpretation by group: {name}", Table(headers, trows), terminal=True)
    report.add_table(f"Explanations: {name}", res.tables["autointerp"])
    report.add_contexts(f"Top contexts: {name}", rec, decode, ai.latents)
    report.add_metrics(
        {f"group{g + 1}/{k}": v for g, m in means.items() for k, v in m.items()}, prefix=f"{name}/autointerp/"
    )
    report.add_metrics(res.metrics, prefix=f"{name}/")

    # the logit lens of the explained latents, for the browser
    lens = logit_lens(sae, host, latents=ai.latents, k=10)
    atomic_write_text(out / "features" / "lens.json", json.dumps([lens.record(j) for j in ai.latents]))

    # steering: the latents whose explanations scored best, keywords from the tokens they fire on
    sc = ic.steer
    ranked = groups.clearest(rows, len(rows), str(sc.by))
    words = {j: groups.context_keywords(rec, j, decode) for j in ranked}
    best = [j for j in ranked if words[j]][: int(sc.n_latents)]  # a latent needs a keyword to be judged
    steering: dict[str, Any] = {"latents": best}
    if best:
        concept = {j: words[j] for j in best}
        result = steering_sweep(
            host, sae, best, list(sc.alphas), list(sc.prompts), concept=concept,
            max_new_tokens=int(sc.max_new_tokens), n_samples=int(sc.n_samples), seed=int(ic.seed),
        )  # fmt: skip
        headers, trows = result.table()
        report.add_table(f"Steering: {name}", Table(headers, trows), terminal=True)
        report.add_figure(f"Steering: {name}", result.plot(out / "steering.png"))
        steering.update(keywords={str(j): v for j, v in concept.items()}, rows=result.rows())

    index = write_browser(out, records=rec, decode=decode)
    report.add_text(f"Feature browser: {name}", f"`{index}` (opens from disk)")
    return {"groups": {str(g + 1): m for g, m in means.items()}, "chosen": chosen, "steering": steering,
            "settings": plain(ic)}  # fmt: skip
