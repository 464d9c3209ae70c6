"""RecSAE activation source: a frozen SASRec's user representation at every valid history position.

RecSAE (arXiv:2411.06112) trains its SAE on `his_vectors[mask]`, the hidden state just before the
prediction layer at every valid position of each training history, with the item order of each
history shuffled ("to avoid models remembering the first item being the target"). Here one row is
one (user, position t) of the user's training sequence: the representation u_t of the history window
i_{t−L+1..t} (L = the host's max_len), i.e. what SASRec would score the next item with after item t.

Rows keep, for analysis, the window's item ids, the user, the position t and the item at t. Splits:
  * train: every (user, position) of the training sequences (order-shuffled when `shuffle_history`);
  * val: the leave-one-out test histories (one per user, the order the recommender sees);
  * analysis "fit" / "heldout": unshuffled windows of two disjoint halves of the users, at most
    `n_analysis` rows each; a concept dictionary is built on "fit" and scored on "heldout".
The train stream is the shared one (`saelab.data.stream`): a fresh seeded permutation of the training
rows per epoch, split by rank under DDP, a pure function of (seed, step, rank, world), so a resumed run
sees the same batches. With `normalize`, training and validation batches are scaled by `act_scale`
(E‖s·x‖² = d_in over the training rows); the `train`, `analysis` and `test` tables keep the host's raw
representations.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from saelab.corpora.movielens import Interactions, exclusion_mask, pad_left
from saelab.data.stream import Batches, Shuffled, StreamPosition, norm_scale, scaled


def history_windows(
    sequences: list[list[int]], max_len: int
) -> tuple[Int[Tensor, "n max_len"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """(windows, user, position): for every user u and position t, the items up to t (last max_len), left-padded."""
    wins, users, pos = [], [], []
    for u, s in enumerate(sequences):
        for t in range(len(s)):
            wins.append(s[max(0, t - max_len + 1) : t + 1])
            users.append(u)
            pos.append(t)
    return pad_left(wins, max_len), torch.tensor(users, dtype=torch.long), torch.tensor(pos, dtype=torch.long)


def shuffle_windows(windows: Int[Tensor, "n L"], generator: torch.Generator) -> Int[Tensor, "n L"]:
    """Randomly permute the items of each window among its valid (non-padding) positions."""
    keys = torch.rand(windows.shape, generator=generator)
    keys = keys.masked_fill(windows == 0, -1.0)  # padding sorts first and stays on the left
    order = keys.argsort(dim=1)
    return windows.gather(1, order)


@torch.no_grad()
def harvest(
    host, windows: Int[Tensor, "n L"], batch_size: int = 2048, desc: str = "harvest"
) -> Float[Tensor, "n d"]:
    """The host's user representation (last position) of each window, in eval mode."""
    was = host.training
    host.eval()
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False):
        out.append(host.user_repr(windows[i : i + batch_size]).float())
    host.train(was)
    return torch.cat(out) if out else torch.zeros(0, host.d_in)


class RecSAEDataModule(StreamPosition, pl.LightningDataModule):
    """Batches `{"acts": [batch, d_in], "window", "user", "pos", "item"}` of SASRec user representations.

    Args:
        d_in: the host's hidden width (asserted against the host).
        host: a trained, frozen SASRec (any module with `d_in`, `max_len` and `user_repr`).
        corpus: the `Interactions` the host was trained on.
        batch_size: rows per SAE training batch.
        shuffle_history: permute each training window's items before harvesting (RecSAE).
        n_analysis: rows in each of the "fit" and "heldout" analysis splits.
        harvest_batch_size: windows per host forward.
        seed: seeds shuffling, the user split and the batch order.
        normalize: scale SAE inputs by s with E‖s·x‖² = d_in over the training rows (`act_scale`).
    """

    def __init__(
        self,
        d_in: int,
        host=None,
        corpus: Interactions | None = None,
        batch_size: int = 512,
        shuffle_history: bool = True,
        n_analysis: int = 16000,
        harvest_batch_size: int = 2048,
        seed: int = 0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if host is None or corpus is None or not hasattr(host, "user_repr"):
            raise ValueError(
                "data=recsae needs a trained SASRec host and its corpus; run it through the recsae recipe "
                "(python -m saelab +experiment=recsae_sasrec)."
            )
        if int(d_in) != host.d_in:
            raise ValueError(f"data.d_in={d_in} but the SASRec host has d_model={host.d_in}; set them equal.")
        self.d_in, self.host, self.corpus = int(d_in), host, corpus
        self.batch_size, self.shuffle_history = int(batch_size), bool(shuffle_history)
        self.n_analysis, self.harvest_batch_size, self.seed = (
            int(n_analysis),
            int(harvest_batch_size),
            int(seed),
        )
        self.normalize, self.act_scale = bool(normalize), 1.0
        self.train: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ harvesting
    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        L = self.host.max_len
        seqs = [self.corpus.train_sequence(u) for u in range(self.corpus.n_users)]
        windows, users, pos = history_windows(seqs, L)
        train_windows = shuffle_windows(windows, g) if self.shuffle_history else windows
        acts = harvest(self.host, train_windows, self.harvest_batch_size, "SASRec states (train)")
        self.train = {
            "acts": acts,
            "window": train_windows,
            "user": users,
            "pos": pos,
            "item": train_windows[:, -1],
        }
        self.act_scale = norm_scale(acts, self.d_in) if self.normalize else 1.0

        # analysis splits: unshuffled windows, two disjoint halves of the users
        perm = torch.randperm(self.corpus.n_users, generator=g)
        half = self.corpus.n_users // 2
        self.analysis = {}
        for name, us in (("fit", perm[:half]), ("heldout", perm[half:])):
            rows = torch.isin(users, us).nonzero(as_tuple=True)[0]
            if len(rows) > self.n_analysis:
                rows = rows[torch.randperm(len(rows), generator=g)[: self.n_analysis]].sort().values
            w = windows[rows]
            a = (
                acts[rows]
                if not self.shuffle_history
                else harvest(self.host, w, self.harvest_batch_size, name)
            )
            self.analysis[name] = {
                "acts": a,
                "window": w,
                "user": users[rows],
                "pos": pos[rows],
                "item": w[:, -1],
            }

        # leave-one-out test histories (the val set of the SAE and the fidelity set)
        hist, tgt = self.corpus.eval_examples("test")
        w = pad_left(hist, L)
        self.test = {
            "acts": harvest(self.host, w, self.harvest_batch_size, "SASRec states (test)"),
            "window": w,
            "target": tgt,
            "exclude": exclusion_mask(hist, tgt, self.corpus.n_items),
        }

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        self.setup()
        if self.train is None:
            raise RuntimeError("RecSAEDataModule.setup() did not build the training table.")
        return self._train_loader(Shuffled(self.train, self.batch_size, self.seed), self.act_scale)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        t, bs = self.test, self.batch_size
        batches = [
            scaled({"acts": t["acts"][i : i + bs], "window": t["window"][i : i + bs]}, self.act_scale)
            for i in range(0, len(t["acts"]), bs)
        ]
        return DataLoader(Batches(batches), batch_size=None)
