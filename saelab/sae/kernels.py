"""Sparse encoder/decoder kernels for TopK-family SAEs.

With k ≪ d_sae only `nnz = Σ_rows k_row` entries of the code matrix are non-zero. The dense
encoder product x @ W_enc is unavoidable in the forward (every latent must be scored), but
everything after selection is done on the nnz entries only:

* decode: x̂_b = Σ_{(b,j)} f_bj · W_dec[j] via `embedding_bag` (no [batch, d_sae] @ [d_sae, d_in]);
* encoder backward: ∂L/∂π is non-zero only at selected entries, so ∂L/∂x, ∂L/∂W_enc and ∂L/∂b_enc
  are gathers and scatter-adds over nnz rows instead of two dense [batch, d_sae] matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

# Rows of the (nnz, d_in) outer-product buffer formed per chunk in the W_enc gradient; bounds memory.
_CHUNK_ELEMS = 1 << 25


def row_offsets(rows: Int[Tensor, " nnz"], batch: int) -> Int[Tensor, " batch"]:
    """EmbeddingBag offsets (start index of each row) for row-sorted coordinates."""
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


class SparseEncode(torch.autograd.Function):
    """vals = ReLU(π[rows, cols]) where π = x_in @ W_enc + b_enc; the selection is made by `select(π)`.

    Returns (vals, rows, cols, pre); only `vals` carries gradient. The backward never forms the dense
    [batch, d_sae] gradient of π.
    """

    @staticmethod
    def forward(ctx, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, select):
        pre = torch.addmm(b_enc, x_in, W_enc)  # (batch, d_sae)
        rows, cols = select(pre)
        vals = pre[rows, cols].relu()  # (nnz,)
        ctx.save_for_backward(x_in, W_enc, rows, cols, vals)
        ctx.mark_non_differentiable(rows, cols, pre)
        return vals, rows, cols, pre

    @staticmethod
    def backward(ctx, grad_vals: Tensor, *_):
        x_in, W_enc, rows, cols, vals = ctx.saved_tensors
        g = grad_vals * (vals > 0)  # ReLU gate, (nnz,)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # ∂L/∂x_b = Σ_j g_bj · W_enc[:, j]  — an embedding-bag over the rows of W_encᵀ
            grad_x = F.embedding_bag(
                cols, W_enc.t().contiguous(), row_offsets(rows, x_in.shape[0]), mode="sum", per_sample_weights=g
            )
        if ctx.needs_input_grad[1]:
            # ∂L/∂W_enc[:, j] = Σ_b g_bj · x_b, scatter-added per latent in bounded chunks
            grad_Wt = torch.zeros(W_enc.shape[1], W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device)
            step = max(1, _CHUNK_ELEMS // max(1, x_in.shape[1]))
            for s in range(0, g.numel(), step):
                r, c, gg = rows[s : s + step], cols[s : s + step], g[s : s + step]
                grad_Wt.index_add_(0, c, x_in[r] * gg[:, None])
            grad_W = grad_Wt.t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return grad_x, grad_W, grad_b, None


def sparse_decode(
    rows: Int[Tensor, " nnz"],
    cols: Int[Tensor, " nnz"],
    vals: Float[Tensor, " nnz"],
    W_dec: Float[Tensor, "d_sae d_in"],
    batch: int,
    offsets: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch d_in"]:
    """Σ_j f_bj · W_dec[j] for each row b, computed as a weighted embedding-bag (no bias added)."""
    if offsets is None:
        offsets = row_offsets(rows, batch)
    if vals.numel() == 0:
        return W_dec.new_zeros(batch, W_dec.shape[1])
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals.to(W_dec.dtype))
