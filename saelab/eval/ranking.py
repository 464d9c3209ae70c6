"""`ranking`: a recommender's HR@K / NDCG@K with its user representation replaced by the SAE's
reconstruction (RecSAE, arXiv:2411.06112), next to the unmodified recommender's, on the source's
leave-one-out test histories (full ranking; metric definitions in `saelab.hosts.ranking`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from saelab.analysis import plots
from saelab.eval.base import EvalResult, Table, in_host_units
from saelab.hosts.ranking import full_ranking
from saelab.types import SAELike


class RankingFidelity:
    """Metrics `clean/hr@K`, `clean/ndcg@K` (the host alone) and `sae/hr@K`, `sae/ndcg@K` (spliced)."""

    name = "ranking"
    needs = ("host", "test")

    def __init__(self, ks: Sequence[int] = (5, 10, 20), plot: bool = True) -> None:
        self.ks, self.plot = tuple(int(k) for k in ks), bool(plot)

    @torch.no_grad()
    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult:
        host, test = source.host, source.test
        args = (test["window"], test["target"], test["exclude"], self.ks)
        clean, _ = full_ranking(host, *args)
        recon = in_host_units(sae, source)
        with host.spliced(lambda u: recon(u).x_hat):
            spliced, _ = full_ranking(host, *args)
        names = [f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")]
        res = EvalResult(
            metrics={**{f"clean/{n}": clean[n] for n in names}, **{f"sae/{n}": spliced[n] for n in names}},
            tables={
                "ranking fidelity": Table(
                    ["metric", "host", "with SAE reconstruction"], [[n, clean[n], spliced[n]] for n in names]
                )
            },  # fmt: skip
        )
        if self.plot:
            res.figures["ranking fidelity"] = plots.bars(
                [n.upper() for n in names],
                {"host": [clean[n] for n in names], "with SAE reconstruction": [spliced[n] for n in names]},
                Path(out_dir) / "fidelity.png",
                "score",
                "Test ranking: original vs SAE-reconstructed user representation",
                xlabel="metric@k (cut-off k of the ranked list)",
            )
        return res
