"""SASRec, the sequential recommender host of RecSAE, as a LightningModule trained by saelab.

Kang & McAuley 2018 (arXiv:1808.09781); the probe site follows RecSAE (arXiv:2411.06112): the hidden
state just before the prediction layer. For a left-padded history i_1..i_L:

    h⁰_t = √d · E[i_t] + P[t]                      (item and learned position embeddings)
    hˡ   = hˡ⁻¹ + Attn(LN(hˡ⁻¹)) ;  hˡ ← hˡ + FFN(LN(hˡ))   (causal self-attention, pre-LN blocks)
    u    = LN(h^n_L)                                (the user representation, `his_vector`)
    s(i) = ⟨u, E[i]⟩                                (dot-product score against every item)

Trained with full softmax cross-entropy over all items at every valid position (next-item
prediction); validated with full-ranking HR@K / NDCG@K on the leave-one-out validation target.

Host surface (as the other hosts): `d_in`, `activations(items)` → hidden states at every position,
`user_repr(items)`, `score(u)` for any (e.g. reconstructed) user vector, and `spliced(fn)`, under which
`forward` scores with fn(u) in place of u.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from saelab.hosts.ranking import hr_ndcg, target_ranks


class _Block(nn.Module):
    """Pre-LN transformer block with causal multi-head self-attention and a ReLU feed-forward."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"SASRec d_model={d} is not divisible by n_heads={n_heads}.")
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: Float[Tensor, "B L d"], allowed: Bool[Tensor, "B 1 L L"]) -> Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (
            t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, L, hs)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.p if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(pl.LightningModule):
    """Self-attentive sequential recommender over item ids 1..n_items (0 = padding).

    Args:
        n_items: number of items (the embedding table has n_items + 1 rows).
        d_model: embedding / hidden width (RecSAE: 64).
        n_layers, n_heads: transformer depth and heads (RecSAE: 1 layer, 1 head).
        max_len: history length (RecSAE: history_max 20).
        dropout: dropout on embeddings, attention and feed-forward.
        lr, weight_decay: Adam settings (RecSAE: lr 1e-4, l2 1e-6 over many more epochs).
        ks: cut-offs of the validation HR/NDCG.
        seed: seeds the weight initialisation.
    """

    def __init__(
        self,
        n_items: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 1,
        max_len: int = 20,
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ks: Sequence[int] = (10,),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if n_items < 1 or max_len < 1:
            raise ValueError(f"SASRec needs n_items >= 1 and max_len >= 1, got {n_items}, {max_len}.")
        self.save_hyperparameters()
        self.n_items, self.d_model, self.max_len = int(n_items), int(d_model), int(max_len)
        self.lr, self.weight_decay, self.ks = float(lr), float(weight_decay), tuple(int(k) for k in ks)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.item_emb = nn.Embedding(n_items + 1, d_model, padding_idx=0)
            self.pos_emb = nn.Embedding(max_len, d_model)
            nn.init.normal_(self.item_emb.weight, std=d_model**-0.5)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
            self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
            self.final_ln = nn.LayerNorm(d_model)
        self.emb_drop = nn.Dropout(dropout)
        self._splice: Callable[[Tensor], Tensor] | None = None
        self._val_ranks: list[Tensor] = []

    # ------------------------------------------------------------------ host surface
    @property
    def d_in(self) -> int:
        return self.d_model

    def activations(self, items: Int[Tensor, "B L"]) -> tuple[Float[Tensor, "B L d"], Bool[Tensor, "B L"]]:
        """Hidden states just before the prediction layer at every position, and the valid-position mask."""
        return self.hidden(items), items > 0

    def hidden(self, items: Int[Tensor, "B L"]) -> Float[Tensor, "B L d"]:
        if items.shape[1] > self.max_len:
            items = items[:, -self.max_len :]
        B, L = items.shape
        valid = items > 0
        pos = torch.arange(self.max_len - L, self.max_len, device=items.device)  # newest item → last position
        h = self.item_emb(items) * math.sqrt(self.d_model) + self.pos_emb(pos)[None]
        h = self.emb_drop(h) * valid[..., None]
        causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
        # a padded query may attend to itself only, so no softmax row is empty
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=items.device)[
            None
        ]
        for block in self.blocks:
            h = block(h, allowed[:, None]) * valid[..., None]
        return self.final_ln(h)

    def user_repr(self, items: Int[Tensor, "B L"]) -> Float[Tensor, "B d"]:
        """The representation at the newest (last) position, `his_vector` in RecSAE."""
        return self.hidden(items)[:, -1]

    def score(self, u: Float[Tensor, "B d"]) -> Float[Tensor, "B n_items_1"]:
        """⟨u, E[i]⟩ for every item; column 0 (padding) is −inf."""
        s = u @ self.item_emb.weight.t()
        s[:, 0] = float("-inf")
        return s

    def forward(self, items: Int[Tensor, "B L"]) -> Float[Tensor, "B n_items_1"]:
        u = self.user_repr(items)
        if self._splice is not None:
            u = self._splice(u)
        return self.score(u)

    @contextlib.contextmanager
    def spliced(self, fn: Callable[[Tensor], Tensor]) -> Iterator[SASRec]:
        """Within the block, `forward` scores items with fn(u) in place of the user representation u."""
        prev, self._splice = self._splice, fn
        try:
            yield self
        finally:
            self._splice = prev

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> Tensor:
        inputs, targets = batch
        logits = self.hidden(inputs) @ self.item_emb.weight.t()  # (B, L, n_items + 1)
        logits[..., 0] = float("-inf")
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
        self.log("sasrec/loss", loss, prog_bar=True, batch_size=inputs.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        history, target, exclude = batch
        self._val_ranks.append(target_ranks(self(history), target, exclude))

    def on_validation_epoch_end(self) -> None:
        if not self._val_ranks:
            return
        metrics = hr_ndcg(torch.cat(self._val_ranks), self.ks)
        self._val_ranks.clear()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
