"""One rank of the two-process gloo DDP test (`test_ddp.py` starts two of these with LOCAL_RANK=0/1).

    python ddp_worker.py ASSETS_JSON OUT_DIR STEPS

For every activation source it trains a tiny BatchTopK SAE with Lightning DDP on CPU and writes
`OUT_DIR/<source>.rank<r>.pt`: the sha256 of every training batch this rank read, and the final state
dict of the LightningModule (the SAE's parameters and buffers, and the dead-latent counter). First it
runs the DDP helpers of `LitSAE` on batches of different sizes per rank and writes `helpers.rank<r>.pt`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from support import SENTENCES

from saelab.lit import LitSAE, batch_acts, end_distributed
from saelab.objectives import MSE, Objective
from saelab.sae import SAE, BatchTopK
from saelab.types import SAEOutput

warnings.filterwarnings("ignore")  # Lightning's advice about workers and logging is noise here

TEXTS = SENTENCES * 8


class Recorder(pl.Callback):
    """sha256 of the "acts" of every training batch, in order."""

    def __init__(self) -> None:
        self.digests: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        acts = batch_acts(batch).detach().cpu().contiguous()
        self.digests.append(hashlib.sha256(acts.numpy().tobytes()).hexdigest())


def datamodules(assets: dict) -> dict:
    """Factories of the five sources on tiny hosts (each built only when its turn comes)."""

    def synthetic():
        from saelab.data.synthetic import SyntheticDataModule

        return SyntheticDataModule(d_in=16, n_features=48, batch_size=64, n_parents=2, children_per_parent=2)

    def protein():
        from saelab.data.protein import ProteinDataModule
        from saelab.hosts.masked_lm import load_masked_lm

        host = load_masked_lm(assets["esm"], hook=1, d_in=16)
        return ProteinDataModule(
            host, 16, files=[assets["swissprot"]], annotations=["transmembrane"], batch_size=32,
            cache=True, cache_dir=assets["cache"], seed=1,
        )  # fmt: skip

    def recsae():
        from saelab.corpora.movielens import load_interactions
        from saelab.data.recsae import RecSAEDataModule
        from saelab.hosts.sasrec import SASRec

        corpus = load_interactions(assets["movielens"], "tiny", min_word_items=100)
        host = SASRec(corpus.n_items, d_model=16, n_layers=1, n_heads=1, max_len=6, seed=0)
        return RecSAEDataModule(16, host, corpus, batch_size=32, n_analysis=50, seed=2)

    def text(cache: bool):
        from saelab.data.text import TextActivations
        from saelab.hosts.causal_lm import CausalLMHost

        host = CausalLMHost(assets["llama"], hook=1, d_in=32)
        return TextActivations(
            host, TEXTS, TEXTS[::-1], context_len=16, train_tokens=600, val_tokens=60, batch_size=32,
            harvest_batch=8, cache=cache, cache_dir=assets["cache"], seed=3,
        )  # fmt: skip

    return {
        "synthetic": synthetic,
        "protein": protein,
        "recsae": recsae,
        "text_live": functools.partial(text, False),
        "text_cached": functools.partial(text, True),
    }


def train(dm, steps: int) -> tuple[list[str], dict]:
    sae = SAE(dm.d_in, 32, BatchTopK(k=4), seed=0)
    lit = LitSAE(
        sae, Objective({"mse": MSE()}), functools.partial(torch.optim.Adam, lr=1e-2),
        dead_window_tokens=100, log_every=1000,
    )  # fmt: skip
    rec = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rec],
    )  # fmt: skip
    trainer.fit(lit, datamodule=dm)
    return rec.digests, {k: v.detach().clone() for k, v in lit.state_dict().items()}


def helpers(rank: int) -> dict:
    """b_dec init and dead-latent counting when the two ranks hold batches of different sizes."""
    sizes = (3, 5)
    xs = [torch.randn(n, 8, generator=torch.Generator().manual_seed(n)) for n in sizes]
    lit = LitSAE(SAE(8, 4, BatchTopK(k=1), seed=0), Objective({"mse": MSE()}), torch.optim.Adam)
    lit._init_b_dec(xs[rank])
    codes = torch.zeros(sizes[rank], 4)
    codes[0, rank] = 1.0  # rank 0 fires latent 0, rank 1 latent 1
    x = xs[rank]
    lit._count_firing(SAEOutput(x=x, x_hat=x, pre_acts=codes, dense=codes), sizes[rank])
    return {"b_dec": lit.sae.b_dec.detach().clone(), "tokens_since_fired": lit.tokens_since_fired.clone()}


def main() -> None:
    assets, out, steps = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), int(sys.argv[3])
    rank = int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(1)
    # one process group for all the fits (Lightning uses an initialised one as it is)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(helpers(rank), out / f"helpers.rank{rank}.pt")
        for name, make in datamodules(assets).items():
            pl.seed_everything(0, verbose=False)
            digests, state = train(make(), steps)
            torch.save({"batches": digests, "state": state}, out / f"{name}.rank{rank}.pt")
    finally:
        # a gloo group left for interpreter shutdown can abort the process ("terminate called without an
        # active exception") after all its work is done
        end_distributed()


if __name__ == "__main__":
    main()
