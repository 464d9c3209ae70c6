"""N SAEs trained in one fit (`recipe=multi`) against the same N SAEs trained one fit each.

With `data.cache=false` the text source runs the host (SmolLM2-135M, layer 6) as training reads it, so
N separate fits pay N host forwards per batch and one multi fit pays one; the SAE steps are the same
work either way. Both sides are whole `python -m saelab` runs (process start and model load included),
run one after the other in this process's machine: the ratio is multi / sum of separate. Target ≤ 0.4×
for four SAEs. That the multi fit's SAEs equal the separate ones bit for bit is a test
(tests/test_multi.py), not measured here.

`--quick` uses the synthetic source instead (no host: the ratio then only shows the saved fit overhead).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from saelab.bench.runs import run_saelab
from saelab.bench.topk import _table

KS = (8, 16, 32, 64)
TARGET = 0.4


def _common(quick: bool, steps: int) -> list[str]:
    base = ["logger=none", "eval/metrics=[]", "export=false", f"trainer.max_steps={steps}"]
    base += [
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=1",
        "+trainer.enable_progress_bar=false",
    ]
    if quick:
        return [*base, "data.d_in=32", "data.batch_size=64", "sae.d_sae=128"]
    return [
        *base,
        "data=text",
        "data.cache=false",
        "data.batch_size=512",
        f"data.train_tokens={512 * steps}",
        "data.val_tokens=512",
        "sae.d_sae=2048",
    ]


def main(args: argparse.Namespace) -> list[str]:
    quick = getattr(args, "quick", False)
    steps = getattr(args, "steps", None) or (10 if quick else 40)
    ks = KS[:2] if quick else KS
    common = _common(quick, steps)
    work = Path(tempfile.mkdtemp(prefix="saelab-bench-multi-"))
    try:
        separate = []
        for k in ks:
            separate.append(
                run_saelab(
                    [*common, f"sae.activation.k={k}", f"+run_dir={work}/k{k}", f"hydra.run.dir={work}/k{k}"],
                    work,
                )
            )
        saes = "{" + ", ".join(f"k{k}: ['sae.activation.k={k}']" for k in ks) + "}"
        one = run_saelab(
            [
                *common,
                "recipe=multi",
                f"recipe.saes={saes}",
                f"+run_dir={work}/multi",
                f"hydra.run.dir={work}/multi",
            ],
            work,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(separate)
    ratio = one / total
    source = "synthetic (no host)" if quick else "text, SmolLM2-135M layer 6, data.cache=false"
    rows = [[f"k={k}", f"{s:.1f}", ""] for k, s in zip(ks, separate)]
    rows.append([f"{len(ks)} separate fits", f"{total:.1f}", "1.000x"])
    mark = "ok" if ratio <= TARGET else "MISSES"
    rows.append([f"one fit of {len(ks)} SAEs", f"{one:.1f}", f"{ratio:.3f}x ({mark}, target ≤ {TARGET}x)"])
    head = f"{len(ks)} TopK SAEs (k {', '.join(map(str, ks))}) in one fit vs one fit each: {source}, {steps} steps"
    return [head, *_table(["run", "wall s", "vs separate"], rows)]
