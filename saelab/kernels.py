"""Sparse encoder/decoder kernels for TopK-family SAEs (Gao et al. 2024, arXiv:2406.04093).

With k ≪ d_sae only `nnz = Σ_rows k_row` entries of the code matrix F [batch, d_sae] are non-zero. The
dense encoder product π = x_in W_enc + b_enc is unavoidable in the forward (every latent must be scored),
but everything after the selection works on the nnz entries only, and no backward touches a dense
[batch, d_sae] tensor:

* decode:    x̂ = F W_dec                         an `embedding_bag` over the rows of W_dec;
* ∂L/∂f_bj = ⟨∂L/∂x̂_b, W_dec[j]⟩                 a sampled dense-dense product (SDDMM) at F's pattern;
* ∂L/∂W_dec = Fᵀ ∂L/∂x̂,  ∂L/∂W_enc = x_inᵀ G       sparse (CSR) × dense products, G = ∂L/∂π (nnz entries);
* ∂L/∂b_enc = colsum(G),  ∂L/∂b_dec|enc = −W_enc colsum(G)   (no [batch, d_in] gradient when x is data).

CSR products are deterministic and exist on CPU and CUDA for float32/float64; half-precision weights are
upcast to float32 for them (MKL and the sampled product have no bf16/fp16 kernels on CPU).
"""

from __future__ import annotations

import warnings
from functools import cached_property

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

_SPARSE_DTYPES = (torch.float32, torch.float64)


def row_offsets(rows: Int[Tensor, " nnz"], batch: int) -> Int[Tensor, " batch"]:
    """EmbeddingBag offsets (start index of each row) for row-sorted coordinates."""
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta" is noise for the two products used here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _SPARSE_DTYPES else torch.float32


class SparseLayout:
    """Row-sorted coordinates (rows, cols) of a [batch, d_sae] code matrix and the index structures
    the sparse products need: CSR by row (for decode and SDDMM) and, built once on first use in the
    backward, CSR by column (the transpose, for the weight gradients). Shared by encoder and decoder.
    """

    def __init__(self, rows: Int[Tensor, " nnz"], cols: Int[Tensor, " nnz"], batch: int, d_sae: int) -> None:
        self.rows, self.cols, self.batch, self.d_sae = rows, cols, int(batch), int(d_sae)

    @classmethod
    def from_selection(
        cls, rows: Tensor, cols: Tensor, batch: int, d_sae: int
    ) -> tuple[SparseLayout, Tensor | None]:
        """Layout with column indices sorted within each row (as cuSPARSE expects); also returns the
        permutation applied to the selection (None when it was already sorted)."""
        key = rows * d_sae + cols  # (nnz,) row-major linear index; rows arrive sorted
        if key.numel() > 1 and bool((key[1:] < key[:-1]).any()):
            key, perm = torch.sort(key)
            return cls(rows[perm], cols[perm], batch, d_sae), perm
        return cls(rows, cols, batch, d_sae), None

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    @cached_property
    def offsets(self) -> Int[Tensor, " batch"]:
        return row_offsets(self.rows, self.batch)

    @cached_property
    def crow(self) -> Int[Tensor, " batch_plus_1"]:
        return torch.cat([self.offsets, self.offsets.new_full((1,), self.nnz)])

    @cached_property
    def _by_col(self) -> tuple[Tensor, Tensor, Tensor]:
        # (col, row) order; rows stay sorted within a column because the sort is stable
        perm = torch.sort(self.cols, stable=True).indices  # (nnz,)
        counts = torch.bincount(self.cols, minlength=self.d_sae)
        ccol = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (d_sae + 1,)
        return perm, ccol, self.rows[perm]

    def csr(self, values: Float[Tensor, " nnz"]) -> Tensor:
        """F as a sparse CSR [batch, d_sae] with the given values (in coordinate order)."""
        return _csr(self.crow, self.cols, values, (self.batch, self.d_sae))

    def csr_t(self, values: Float[Tensor, " nnz"]) -> Tensor:
        """Fᵀ as a sparse CSR [d_sae, batch] with the given values (in coordinate order)."""
        perm, ccol, rows = self._by_col
        return _csr(ccol, rows, values[perm], (self.d_sae, self.batch))

    def t_matmul(
        self, values: Float[Tensor, " nnz"], dense: Float[Tensor, "batch n"]
    ) -> Float[Tensor, "d_sae n"]:
        """Fᵀ · dense, in dense's dtype."""
        wd = _work_dtype(dense.dtype)
        if self.nnz == 0:
            return dense.new_zeros(self.d_sae, dense.shape[1])
        # in-place into an uninitialised buffer with beta=0 (its contents are ignored): `csr @ dense` would
        # zero-fill a result and copy a second one into it, two extra passes over [d_sae, n]
        out = torch.empty(self.d_sae, dense.shape[1], dtype=wd, device=dense.device)
        out.addmm_(self.csr_t(values.to(wd)), dense.to(wd), beta=0.0)
        return out.to(dense.dtype)

    def sampled(self, a: Float[Tensor, "batch n"], b: Float[Tensor, "d_sae n"]) -> Float[Tensor, " nnz"]:
        """(a bᵀ)[rows, cols]: the product evaluated at the nnz coordinates only (SDDMM)."""
        wd = _work_dtype(a.dtype)
        if self.nnz == 0:
            return a.new_zeros(0)
        pattern = self.csr(a.new_zeros(self.nnz, dtype=wd))
        out = torch.sparse.sampled_addmm(pattern, a.to(wd), b.to(wd).t(), beta=0.0)
        return out.values().to(a.dtype)

    def colsum(self, values: Float[Tensor, " nnz"]) -> Float[Tensor, " d_sae"]:
        """Σ over rows of F per latent."""
        return values.new_zeros(self.d_sae).index_add_(0, self.cols, values)


class SparseEncode(torch.autograd.Function):
    """vals = ReLU(π[rows, cols]) with π = (x − b_dec) W_enc + b_enc precomputed (without graph) by the caller.

    Inputs: x, b_dec (or None when b_dec is not subtracted), W_enc, b_enc, then x_in = x − b_dec, π and
    the layout (all three without gradient). Only `vals` is an output. The backward, with G = ∂L/∂π
    (non-zero at the nnz coordinates only, ReLU-gated):
        ∂L/∂W_enc = x_inᵀ G  (CSR product),  ∂L/∂b_enc = colsum(G),
        ∂L/∂x = G W_encᵀ (embedding-bag; only when x itself needs a gradient),
        ∂L/∂b_dec = −W_enc colsum(G)  (= −Σ_b ∂L/∂x_b, a mat-vec instead of a [batch, d_in] product).
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, x_in, pre, layout: SparseLayout):
        vals = pre[layout.rows, layout.cols].relu()  # (nnz,)
        ctx.save_for_backward(x_in, W_enc, vals)
        ctx.layout = layout
        return vals

    @staticmethod
    def backward(ctx, grad_vals: Tensor):
        x_in, W_enc, vals = ctx.saved_tensors
        lay: SparseLayout = ctx.layout
        need_x, need_bdec, need_W, need_benc = ctx.needs_input_grad[:4]
        g = grad_vals * (vals > 0)  # ReLU gate, (nnz,)
        grad_x = grad_bdec = grad_W = grad_benc = None
        if need_W:
            grad_Wt = lay.t_matmul(g, x_in)  # (d_sae, d_in)
            # hand back W_enc's own strides (AccumulateGrad would copy otherwise; DDP buckets expect them):
            # W_enc = W_decᵀ-initialised SAEs store it column-major, so the transpose view is already right
            grad_W = grad_Wt.t() if W_enc.t().is_contiguous() else grad_Wt.t().contiguous()
        if need_benc or need_bdec:
            colsum = lay.colsum(g)  # (d_sae,)
            if need_benc:
                grad_benc = colsum
            if need_bdec:
                grad_bdec = -(W_enc @ colsum.to(W_enc.dtype))  # (d_in,)
        if need_x:
            # ∂L/∂x_b = Σ_j g_bj · W_enc[:, j]  — an embedding-bag over the rows of W_encᵀ
            grad_x = F.embedding_bag(
                lay.cols,
                W_enc.t().contiguous(),
                lay.offsets,
                mode="sum",
                per_sample_weights=g.to(W_enc.dtype),
            )
        return grad_x, grad_bdec, grad_W, grad_benc, None, None, None


class SparseDecode(torch.autograd.Function):
    """x̂_b = Σ_{(b,j)} f_bj · W_dec[j] (no bias). Backward: ∂L/∂f = SDDMM(∂L/∂x̂, W_dec), ∂L/∂W_dec = Fᵀ ∂L/∂x̂."""

    @staticmethod
    def forward(ctx, vals, W_dec, layout: SparseLayout):
        ctx.save_for_backward(vals, W_dec)
        ctx.layout = layout
        return _embedding_decode(layout, vals, W_dec)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        vals, W_dec = ctx.saved_tensors
        lay: SparseLayout = ctx.layout
        grad_vals = grad_W = None
        if lay.nnz == 0:
            return (
                (vals.new_zeros(0) if ctx.needs_input_grad[0] else None),
                (torch.zeros_like(W_dec) if ctx.needs_input_grad[1] else None),
                None,
            )
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        if ctx.needs_input_grad[0]:
            grad_vals = lay.sampled(grad_out, W_dec).to(vals.dtype)  # (nnz,)
        if ctx.needs_input_grad[1]:
            grad_W = lay.t_matmul(vals.to(W_dec.dtype), grad_out)  # (d_sae, d_in), W_dec's layout
        return grad_vals, grad_W, None


def _embedding_decode(layout: SparseLayout, vals: Tensor, W_dec: Tensor) -> Tensor:
    if layout.nnz == 0:
        return W_dec.new_zeros(layout.batch, W_dec.shape[1])
    return F.embedding_bag(
        layout.cols, W_dec, layout.offsets, mode="sum", per_sample_weights=vals.to(W_dec.dtype)
    )


def sparse_encode(
    x: Float[Tensor, "batch d_in"],
    b_dec: Float[Tensor, " d_in"] | None,
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    select,
) -> tuple[Float[Tensor, " nnz"], SparseLayout, Float[Tensor, "batch d_sae"]]:
    """Score all latents, select with `select(π) -> (rows, cols)`, and return (vals, layout, π).

    π is computed outside the autograd graph (it is never differentiated densely); `vals` carries the
    gradient to x, b_dec, W_enc and b_enc through `SparseEncode`.
    """
    with torch.no_grad():
        x_in = x - b_dec if b_dec is not None else x
        pre = torch.addmm(b_enc, x_in, W_enc)  # (batch, d_sae)
        rows, cols = select(pre)
    layout, _ = SparseLayout.from_selection(rows, cols, pre.shape[0], pre.shape[1])
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, b_dec, W_enc, b_enc)
    )
    if needs_grad:
        vals = SparseEncode.apply(x, b_dec, W_enc, b_enc, x_in, pre, layout)
    else:
        vals = pre[layout.rows, layout.cols].relu()
    return vals, layout, pre


def sparse_decode(
    rows: Int[Tensor, " nnz"],
    cols: Int[Tensor, " nnz"],
    vals: Float[Tensor, " nnz"],
    W_dec: Float[Tensor, "d_sae d_in"],
    batch: int,
    offsets: Int[Tensor, " batch"] | None = None,
    layout: SparseLayout | None = None,
) -> Float[Tensor, "batch d_in"]:
    """Σ_j f_bj · W_dec[j] for each row b (no bias added), for row-sorted coordinates.

    Forward is a weighted embedding-bag; with gradient enabled the backward is `SparseDecode`'s.
    """
    if layout is None:
        layout = SparseLayout(rows, cols, batch, W_dec.shape[0])
        if offsets is not None:
            layout.offsets = offsets  # fills the cached property
    if torch.is_grad_enabled() and (vals.requires_grad or W_dec.requires_grad):
        return SparseDecode.apply(vals, W_dec, layout)
    return _embedding_decode(layout, vals, W_dec)
