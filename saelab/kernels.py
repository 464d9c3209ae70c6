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

Mixed precision (`trainer.precision=bf16-mixed`: Lightning runs the step under `torch.autocast` on "cpu"
or "cuda" with bfloat16) follows sparsify's GPU setup: EleutherAI sparsify keeps fp32 parameters and wraps
`SparseCoder.forward` in bf16 autocast, so its fused encoder's linear and top-k run in bf16, the selected
activations are cast back to the parameter dtype before its embedding-bag decoder, and FVU and AuxK are
computed from that fp32 output. Here likewise: π is autocast's bf16 `addmm` and the selection reads it (ties
resolved by `topk_indices`); `vals` leave `SparseEncode` in the parameter dtype, so their gradient arrives
in fp32 and the encoder backward (CSR products with the fp32 x_in) is fp32 too; the decoder and every
backward here run with autocast off (`no_autocast`), so nothing after the selection is bf16. Without
autocast nothing changes: the casts are no-ops and `no_autocast` is a null context.
"""

from __future__ import annotations

import contextlib
import warnings
from contextlib import AbstractContextManager
from functools import cache, cached_property

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

_SPARSE_DTYPES = (torch.float32, torch.float64)
# dtypes whose 8 (bf16) or 11 (fp16) significant bits make equal pre-activations common
LOW_PRECISION = (torch.bfloat16, torch.float16)


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for `device`'s type (False on a device type autocast does not know)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def no_autocast(device: torch.device) -> AbstractContextManager:
    """Autocast off for `device`'s type while it is on (a null context otherwise): an fp32 region."""
    return torch.autocast(device.type, enabled=False) if autocast_on(device) else contextlib.nullcontext()


def topk_indices(v: Float[Tensor, "rows n"], k: int) -> Int[Tensor, "rows k"]:
    """Column indices of the k largest entries of each row, ascending; ties at the k-th value go to the
    lowest index. Exactly k per row, and the same on every device and thread count.

    torch.topk returns exactly k, but which of several equal values it keeps is unspecified (on CPU,
    whatever its partial sort leaves). In bf16 (8 significant bits) equal values at the boundary are the
    rule, not the exception: in a row of 16384 Gaussian π with k = 32, about half the rows have their k-th
    and (k+1)-th values equal. So take c = k + k/4 + 8 candidates with torch.topk, order them by index,
    stable-sort them by value (largest first) and keep the first k: among equal values the lowest indices
    come first. A row whose tie group may reach past the candidates (its c-th value equals its k-th) is
    redone exactly over the whole row (`_topk_exact`); with Gaussian π that is rare, as the margin is wider
    than the expected group, at most about k·t²/128 entries for a k-th value t standard deviations out.
    """
    n = v.shape[-1]
    c = min(n, k + k // 4 + 8)
    vals, idx = top_candidates(v, c)  # (rows, c)
    if v.dtype in LOW_PRECISION:
        # one top-k over (value, −index) packed in an int64: the value's order as a signed integer (the bit
        # pattern with the magnitude bits of negative values flipped; + 0 makes −0 the same as +0) above,
        # the column below, so equal values rank by the lower index (3.3 ms against 6.4 over [4096, 48] here)
        bits = (vals + 0).view(_BITS_AS_INT[v.dtype])
        magnitude = torch.iinfo(bits.dtype).max  # the bits below the sign
        order = torch.where(bits < 0, bits ^ magnitude, bits).to(torch.int64)  # (rows, c) monotone in value
        pick = ((order << 32) - idx).topk(k, dim=-1, sorted=False).indices  # (rows, k)
    else:
        idx, by_index = idx.sort(dim=-1)
        vals = vals.gather(-1, by_index)
        pick = torch.sort(vals, dim=-1, descending=True, stable=True).indices[:, :k]  # (rows, k)
    out = idx.gather(-1, pick)
    if c < n:
        kth = vals.gather(-1, pick).amin(-1, keepdim=True)  # (rows, 1) the k-th largest value
        spill = (vals.amin(-1, keepdim=True) == kth).squeeze(-1)  # the c-th equals it: the group may go on
        if bool(spill.any()):
            out[spill] = _topk_exact(v[spill], k, kth[spill])
    return out.sort(dim=-1).values


STRIPE = 8  # entries per stripe in `top_candidates`


def top_candidates(
    v: Float[Tensor, "rows n"], c: int
) -> tuple[Float[Tensor, "rows c"], Int[Tensor, "rows c"]]:
    """The c largest entries of each row and their column indices, unordered: what `v.topk(c, sorted=False)`
    returns (the same values; which of several entries equal to the c-th value is taken is unspecified in
    both), faster on wide rows.

    Each row is cut into n/8 stripes of 8 entries, stripe j holding columns j, j + n/8, j + 2n/8, …; the
    stripe maxima are one elementwise max over 8 contiguous slices. Only the c stripes with the largest
    maxima can hold a top-c entry: if τ is the c-th largest stripe maximum, the c chosen stripes hold c
    distinct entries ≥ τ, so every entry of the top c is ≥ τ, every entry > τ lies in a chosen stripe, and
    the chosen stripes hold enough entries equal to τ. So the top c of those c·8 entries are the row's top c.
    The c largest stripe maxima are found the same way (recursively). Rows too narrow for this to gain
    (n < 4·c·8, or n not a multiple of 8) and tensors off the CPU (where it was measured) use `torch.topk`.

    Floats are compared through their bit patterns read as signed integers (integer max and top-k are about
    twice as fast as bf16's here): for floats with the sign bit clear (+0 to +inf, then NaN, as torch.topk
    ranks NaN first) the integer order is the float order, and every float with the sign bit set is a
    negative integer. So a row with at least c sign-clear entries has its top c among them and the integer
    order finds it; a row with fewer (its c-th integer is negative) is redone on the floats. The one
    difference from torch.topk: a NaN with the sign bit set ranks below every non-negative entry instead of
    first (NaN inputs and weights are refused before they get here: the loss check, `SAE.set_weights`).
    """
    n = v.shape[-1]
    if v.device.type != "cpu" or n % STRIPE or n < 4 * c * STRIPE:
        return v.topk(c, dim=-1, sorted=False)
    as_int = _BITS_AS_INT.get(v.dtype)
    if as_int is None:
        return _striped_top(v, c)
    vals, cols = _striped_top(v.view(as_int), c)
    short = vals.amin(dim=-1) < 0  # fewer than c sign-clear entries in the row
    vals = vals.view(v.dtype)
    if bool(short.any()):
        rows = short.nonzero(as_tuple=True)[0]
        vals[rows], cols[rows] = _striped_top(v[rows], c)
    return vals, cols


# float dtype -> the signed integer dtype of its width (`top_candidates` compares bit patterns)
_BITS_AS_INT = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _striped_top(v: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """`top_candidates`' stripe search on v's own order (callers have checked the shape)."""
    rows, w = v.shape[0], v.shape[-1] // STRIPE
    peaks = v.view(rows, STRIPE, w).amax(dim=1)  # (rows, w): stripe maxima
    stripes = top_candidates(peaks, c)[1]  # (rows, c)
    cols = (stripes.unsqueeze(-1) + w * torch.arange(STRIPE, device=v.device)).view(rows, c * STRIPE)
    vals, at = v.gather(1, cols).topk(c, dim=-1, sorted=False)
    return vals, cols.gather(1, at)


def _topk_exact(v: Tensor, k: int, kth: Tensor) -> Tensor:
    """`topk_indices` over whole rows given each row's k-th largest value: every entry above it, then the
    lowest-indexed entries equal to it until the row has k (ascending)."""
    keep = v > kth  # (rows, n)
    need = k - keep.sum(-1)  # (rows,) how many of the tied entries each row takes
    r, c = (v == kth).nonzero(as_tuple=True)  # row-major: each row's tied entries by index
    counts = torch.bincount(r, minlength=v.shape[0])
    rank = torch.arange(r.numel(), device=v.device) - (torch.cumsum(counts, 0) - counts)[r]
    take = rank < need[r]
    keep[r[take], c[take]] = True
    return keep.nonzero(as_tuple=True)[1].view(v.shape[0], k)


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


def encoder_affine(
    x: Float[Tensor, "batch d"], W: Float[Tensor, "d n"], b: Float[Tensor, " n"], dtype: torch.dtype
) -> Float[Tensor, "batch n"]:
    """x W + b in `dtype` with fp32 accumulation, without gradient: the encoder's dense product.

    On a CPU whose torch has oneDNN, fp32 and bf16 run as oneDNN's linear, the bias added inside the kernel
    and, for batches of at least `PACK_MIN_BATCH` rows, the weight reordered into its blocked layout first.
    `addmm` instead copies the bias into the [batch, n] output and passes over it again, and re-blocks the
    weight inside every product; and torch's fp32 `addmm` is MKL's, which on this AMD CPU runs far below
    oneDNN's. At [4096, 768] @ [768, 16384]
    here: bf16 addmm 303 ms against 265 ms (the reorder is 4 ms of that); fp32 addmm 706 ms against 516 ms.
    In bf16 the result is addmm's (autocast's) bit for bit; in fp32 the same products summed in another
    order. Elsewhere, and where that op is missing, it is the addmm.
    """
    batch = x.shape[0]
    if (
        x.device.type == "cpu"
        and dtype in _ONEDNN_DTYPES
        and batch * W.numel() >= ONEDNN_MIN_MACS
        and has_onednn_linear(dtype)
    ):
        Wt = W.t().to(dtype).contiguous()  # (n, d): a view or a plain cast for W_enc stored column-major
        if batch >= PACK_MIN_BATCH:  # the reorder pays for itself over enough rows
            Wt = torch.ops.mkldnn._reorder_linear_weight(Wt, batch)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype).contiguous(), Wt, b.to(dtype), "none", [], "")
    return torch.addmm(b.to(dtype), x.to(dtype), W.to(dtype))


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# below this many multiply-adds addmm's smaller fixed cost wins (32·16·64: 4 µs against 22 µs here)
ONEDNN_MIN_MACS = 1 << 18
# the blocked-layout reorder pays from this batch on: fp32 here, reorder + linear against linear alone,
# 3.4 against 3.1 ms at [1024, 128] @ [128, 2048] and 71 against 67 ms at [1024, 576] @ [576, 8192], but
# 635 against 723 ms at [4096, 768] @ [768, 16384]
PACK_MIN_BATCH = 2048


@cache
def has_onednn_linear(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch has oneDNN's linear for `dtype`, over a prepacked weight and a plain one, and it
    gives addmm's result (checked once: bit for bit in bf16, to rounding in fp32)."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(*s, generator=g).to(dtype) for s in ((5, 24), (24, 40), (40,)))
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(W.t().contiguous(), 5)
        outs = [
            torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "") for w in (packed, W.t().contiguous())
        ]
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    want = torch.addmm(b, x, W)
    if dtype == torch.bfloat16:
        return all(torch.equal(out, want) for out in outs)
    return all(torch.allclose(out, want, rtol=1e-5, atol=1e-5) for out in outs)


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
        """(a bᵀ)[rows, cols]: the product evaluated at the nnz coordinates only (SDDMM).

        It evaluates (b aᵀ) at the transposed (column-sorted) pattern, so that each row of b is read once
        and the rows of a (the smaller operand, `batch` rows) are the ones revisited: with d_sae ≫ batch
        that halved the decoder backward's SDDMM here (W_dec, 48 MiB, against ∂L/∂x̂, 12 MiB). Each value
        is the same dot product, in the same order, as at the row-sorted pattern; the column-sorted
        structure it builds is the one `t_matmul` reuses.
        """
        wd = _work_dtype(a.dtype)
        if self.nnz == 0:
            return a.new_zeros(0)
        perm, ccol, rows = self._by_col
        pattern = _csr(ccol, rows, a.new_zeros(self.nnz, dtype=wd), (self.d_sae, self.batch))
        vals = torch.sparse.sampled_addmm(pattern, b.to(wd), a.to(wd).t(), beta=0.0).values()
        return torch.empty_like(vals).index_put_((perm,), vals).to(a.dtype)

    def colsum(self, values: Float[Tensor, " nnz"]) -> Float[Tensor, " d_sae"]:
        """Σ over rows of F per latent."""
        return values.new_zeros(self.d_sae).index_add_(0, self.cols, values)


class SparseEncode(torch.autograd.Function):
    """vals = ReLU(π[rows, cols]) with π = (x − b_dec) W_enc + b_enc evaluated (without graph) by the caller.

    Inputs: x, b_dec (or None when b_dec is not subtracted), W_enc, b_enc, then x_in = x − b_dec, the
    selected entries π[rows, cols] in layout order and the layout (all three without gradient). Only `vals`
    is an output. The backward, with G = ∂L/∂π (non-zero at the nnz coordinates only, ReLU-gated):
        ∂L/∂W_enc = x_inᵀ G  (CSR product),  ∂L/∂b_enc = colsum(G),
        ∂L/∂x = G W_encᵀ (embedding-bag; only when x itself needs a gradient),
        ∂L/∂b_dec = −W_enc colsum(G)  (= −Σ_b ∂L/∂x_b, a mat-vec instead of a [batch, d_in] product).
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, x_in, picked, layout: SparseLayout):
        vals = picked.to(W_enc.dtype).relu()  # (nnz,) bf16 π (autocast) upcast
        ctx.save_for_backward(x_in, W_enc, vals)
        ctx.layout = layout
        return vals

    @staticmethod
    def backward(ctx, grad_vals: Tensor):
        with no_autocast(grad_vals.device):  # a backward run inside an autocast block stays fp32
            return SparseEncode._backward(ctx, grad_vals)

    @staticmethod
    def _backward(ctx, grad_vals: Tensor):
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


class ColumnEncode(torch.autograd.Function):
    """π[:, cols] = (x − b_dec) W_enc[:, cols] + b_enc[cols] for a subset of latents (AuxK's dead ones), dense,
    with gradient; the forward product is `encoder_affine`'s (oneDNN's linear on CPU; `dtype` is bf16 under
    autocast). The backward is fp32 and forms ∂L/∂b_dec as −W colsum(G), a mat-vec, instead of the
    [batch, d_in] product that autograd would make and then sum (as `SparseEncode` does); that product is
    made only when x itself needs a gradient. Inputs: x, b_dec (or None), W_enc, b_enc, cols, dtype."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, cols, dtype):
        x_in = x - b_dec if b_dec is not None else x
        W = W_enc.index_select(1, cols)  # (d_in, n)
        pre = encoder_affine(x_in, W, b_enc.index_select(0, cols), dtype)  # (batch, n)
        ctx.save_for_backward(x_in, W, cols, W_enc)
        ctx.d_sae = b_enc.shape[0]
        return pre

    @staticmethod
    def backward(ctx, grad_pre: Tensor):
        with no_autocast(grad_pre.device):
            x_in, W, cols, W_enc = ctx.saved_tensors
            need_x, need_bdec, need_W, need_benc = ctx.needs_input_grad[:4]
            g = grad_pre.to(W.dtype)  # (batch, n) fp32
            grad_x = grad_bdec = grad_W = grad_benc = None
            if need_W:  # x_inᵀ G into W_enc's own strides (AccumulateGrad would copy otherwise)
                grad_W = torch.zeros_like(W_enc).index_copy_(1, cols, x_in.t() @ g)
            if need_benc or need_bdec:
                colsum = g.sum(0)  # (n,)
                if need_benc:
                    grad_benc = colsum.new_zeros(ctx.d_sae).index_copy_(0, cols, colsum)
                if need_bdec:
                    grad_bdec = -(W @ colsum)  # (d_in,)
            if need_x:
                grad_x = g @ W.t()
            return grad_x, grad_bdec, grad_W, grad_benc, None, None


class SparseDecode(torch.autograd.Function):
    """x̂_b = Σ_{(b,j)} f_bj · W_dec[j] (no bias). Backward: ∂L/∂f = SDDMM(∂L/∂x̂, W_dec), ∂L/∂W_dec = Fᵀ ∂L/∂x̂."""

    @staticmethod
    def forward(ctx, vals, W_dec, layout: SparseLayout):
        ctx.save_for_backward(vals, W_dec)
        ctx.layout = layout
        return _embedding_decode(layout, vals, W_dec)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with no_autocast(grad_out.device):
            return SparseDecode._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
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
    screen_k: int | None = None,
) -> tuple[Float[Tensor, " nnz"], SparseLayout, Float[Tensor, "batch d_sae"]]:
    """Score all latents, select with `select(π) -> (rows, cols)`, and return (vals, layout, π).

    π is computed outside the autograd graph (it is never differentiated densely); `vals` carries the
    gradient to x, b_dec, W_enc and b_enc through `SparseEncode`. Under autocast π is bf16 (so are the
    selection's comparisons) and `vals` are in W_enc's dtype (see the module docstring). With `screen_k`
    (a per-row TopK of that k, where `screen_applies`) the selection is `screened_topk`'s: the same
    latents as an fp32 top-k, found from a bf16 product, and π is that bf16 product.
    """
    picked = None
    with torch.no_grad():
        x_in = x - b_dec if b_dec is not None else x
        if screen_k is not None:
            cols, picked, pre = screened_topk(x_in, W_enc, b_enc, screen_k)
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(screen_k)
            cols, picked = cols.reshape(-1), picked.reshape(-1)  # row-major, columns ascending
        else:  # (batch, d_sae) in autocast's dtype under autocast, else in the weights'
            mixed = autocast_on(x.device)
            pre = encoder_affine(
                x_in, W_enc, b_enc, torch.get_autocast_dtype(x.device.type) if mixed else W_enc.dtype
            )
            rows, cols = select(pre)
    layout, perm = SparseLayout.from_selection(rows, cols, pre.shape[0], pre.shape[1])
    if picked is None:
        picked = pre[layout.rows, layout.cols]
    elif perm is not None:
        picked = picked[perm]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, b_dec, W_enc, b_enc)
    )
    if needs_grad:
        vals = SparseEncode.apply(x, b_dec, W_enc, b_enc, x_in, picked, layout)
    else:
        vals = picked.to(W_enc.dtype).relu()
    return vals, layout, pre


# ---------------------------------------------------------------------------------------------- screening
# bf16 unit roundoff (8 significant bits, round to nearest)
_U = 2.0**-8
SCREEN_MIN_WEIGHTS = 1 << 22  # `screen=None` (auto) screens SAEs with at least d_in·d_sae = 4 Mi weights


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are much faster than fp32 here (CUDA with bf16, AMX or AVX512-BF16 CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(
            getattr(torch.cpu, f, lambda: False)()
            for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        )
    return False


def screen_candidates(k: int) -> int:
    """How many bf16 candidates a row's exact top-k is chosen from in the first pass: with Gaussian-like π
    (d_sae 16384, k 32) a margin of 2k + 8 past the k-th leaves nearly every row certified."""
    return 3 * k + 8


def screen_applies(screen: bool | None, W_enc: Tensor, k: int) -> bool:
    """Whether a TopK(k) selection over `x @ W_enc` is screened (`screened_topk`), on W_enc's device.

    Never under autocast (π is bf16 there by request) nor for non-fp32 weights, nor when the candidates
    would be most of a row. `screen=True` screens otherwise; `None` (auto) where bf16 products are fast on
    a CPU and the encoder has at least `SCREEN_MIN_WEIGHTS` weights (below that the product is too small a
    share of the step to gain); `False` never.
    """
    device = W_enc.device
    if screen is False or W_enc.dtype != torch.float32 or autocast_on(device):
        return False
    if screen_candidates(k) + 1 >= W_enc.shape[1]:
        return False
    if screen:
        return True
    return device.type == "cpu" and fast_bf16(device) and W_enc.numel() >= SCREEN_MIN_WEIGHTS


class ScreenStats:
    """Rows screened, rows that needed the second (wider) pass, and rows that fell back to the full fp32
    product, since the counters were reset."""

    rows = 0
    retried = 0
    fallback = 0

    @classmethod
    def reset(cls) -> None:
        cls.rows = cls.retried = cls.fallback = 0


class ScreenPolicy:
    """When `screen=None` (auto) screens: while it pays. Each screened call records the share of its rows
    that needed the second pass (or the fp32 fallback); an exponential average of that share above
    `max_retried` turns screening off, and one call in `probe_every` screens anyway to look again.

    The selection is the fp32 top-k either way, so this changes speed, not results (and the dtype of
    `pre_acts`: bf16 on screened calls). The threshold is measured: training a TopK SAE on SmolLM2-135M
    layer-6 activations (d_in 576, d_sae 8192, k 32, batch 1024), the screened step was 10% faster while
    under 1% of rows were retried, as fast at 10%, and 9% and 14% slower at 14% and 19%; the rows a first
    pass cannot certify grow as the SAE trains (a few large residual dimensions loosen the bound).
    """

    def __init__(self, max_retried: float = 0.05, probe_every: int = 64) -> None:
        self.max_retried, self.probe_every = float(max_retried), int(probe_every)
        self.retried_share = 0.0  # exponential average over screened calls
        self._since_probe = 0

    def wants(self) -> bool:
        """Whether the next call screens."""
        if self.retried_share <= self.max_retried:
            return True
        self._since_probe += 1
        if self._since_probe >= self.probe_every:
            self._since_probe = 0
            return True
        return False

    def record(self, rows: int, retried: int) -> None:
        self.retried_share = 0.5 * self.retried_share + 0.5 * retried / max(rows, 1)


@torch.no_grad()
def screened_topk(
    x_in: Float[Tensor, "batch d_in"], W: Float[Tensor, "d_in d_sae"], b: Float[Tensor, " d_sae"], k: int
) -> tuple[Int[Tensor, "batch k"], Float[Tensor, "batch k"], Tensor]:
    """The exact fp32 top-k of π = x_in W + b per row, found from a bf16 product: (cols ascending, π at
    cols in fp32, the bf16 π̃).

    The bf16 product π̃ (about 3× faster than fp32 on CPUs with AVX512-BF16 or AMX) proposes c = 3k + 8
    candidates per row, the c largest π̃; their π is evaluated in fp32 (a sampled product, batch·c·d_in
    multiply-adds) and the k largest of those are kept. A row is *certified* when its k-th fp32 value
    exceeds a bound on every non-candidate's π; its selection is then the fp32 top-k. Rows that are not
    certified get a second pass with 4 times the candidates (at most half the row): on real LM
    activations, where a few large residual dimensions loosen the bound, most of them certify there. The
    rest (near-ties, non-finite inputs) are recomputed with the full fp32 product, so the result is the
    fp32 top-k in every row; `ScreenStats` counts both.

    The bound (u = 2⁻⁸, bf16's unit roundoff; γ = d·2⁻²⁴/(1 − d·2⁻²⁴) for the fp32 accumulation): rounding
    x_in and W to bf16 moves each product term by at most (2u + u²)|x_i||W_ij|, accumulation adds
    γ(1 + u)²Σ|x_i||W_ij|, and Cauchy–Schwarz bounds Σ|x_i||W_ij| by ‖x‖·max_j‖W_j‖. Rounding b to bf16
    and the output (once or twice, whichever the kernel does) to bf16 adds at most 2.02u(|π̃| + max|b|).
    Every non-candidate has π̃ ≤ m, the (c+1)-th largest π̃ of its row, so its π is at most
    m + 2.02u(|m| + max|b|) + (2u + u² + γ(1 + u)²)‖x‖ max_j‖W_j‖; the row is certified when its k-th
    fp32 value is strictly above that. (Denormal products flushed to zero change a sum by < d·2⁻¹²⁶.)
    The same reasoning bounds the bf16 Gram of OrtSAE's penalty (`saelab.objectives.terms`).
    """
    batch, d_in = x_in.shape
    pre = encoder_affine(x_in, W, b, torch.bfloat16)  # (batch, d_sae)
    gamma = d_in * 2.0**-24 / (1 - d_in * 2.0**-24)
    slack = (2 * _U + _U * _U + gamma * (1 + _U) ** 2) * x_in.norm(dim=1, keepdim=True) * W.norm(dim=0).max()
    slack = slack + 2.02 * _U * b.abs().max() + d_in * 2.0**-126  # (batch, 1)
    c = screen_candidates(k)
    cols, vals, ok = _certify(pre, x_in, W, b, k, c, slack)
    ScreenStats.rows += batch
    bad = (~ok).nonzero(as_tuple=True)[0]
    c2 = min(4 * c, W.shape[1] // 2)
    if bad.numel() and c2 > c:  # a second, wider pass over the rows whose tie region reached past c
        ScreenStats.retried += bad.numel()
        cols2, vals2, ok2 = _certify(pre[bad], x_in[bad], W, b, k, c2, slack[bad])
        cols[bad], vals[bad] = cols2, vals2
        bad = bad[~ok2]
    if bad.numel():
        ScreenStats.fallback += bad.numel()
        full = encoder_affine(x_in[bad], W, b, W.dtype)  # (n_bad, d_sae) fp32
        fc = full.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        cols[bad], vals[bad] = fc, full.gather(-1, fc)
    return cols, vals, pre


def _certify(pre: Tensor, x_in: Tensor, W: Tensor, b: Tensor, k: int, c: int, slack: Tensor):
    """One screening pass with c candidates a row: (cols ascending, fp32 π at cols, certified rows)."""
    rows = pre.shape[0]
    cv, ci = top_candidates(pre, c + 1)  # (rows, c + 1)
    m, drop = cv.float().min(dim=-1, keepdim=True)  # (rows, 1): every non-candidate has π̃ ≤ m
    keep = torch.ones_like(ci, dtype=torch.bool).scatter_(1, drop, False)
    cand = ci[keep].view(rows, c).sort(dim=-1).values  # (rows, c) ascending
    at_cand = SparseLayout(
        torch.arange(rows, device=pre.device).repeat_interleave(c), cand.reshape(-1), rows, W.shape[1]
    )
    exact = at_cand.sampled(x_in, W.t()).view(rows, c) + b[cand]
    top, at = exact.topk(k, dim=-1, sorted=False)  # (rows, k) fp32 π at the candidates
    ok = top.amin(dim=-1, keepdim=True) > m + 2.02 * _U * m.abs() + slack  # False for NaN
    at, order = at.sort(dim=-1)  # candidates are ascending, so their positions order the columns
    return cand.gather(-1, at), top.gather(-1, order), ok.squeeze(-1)


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

    Forward is a weighted embedding-bag; with gradient enabled the backward is `SparseDecode`'s. Both run
    in W_dec's dtype with autocast off (bf16 `vals` are upcast): the decoder is never bf16 under autocast.
    """
    if layout is None:
        layout = SparseLayout(rows, cols, batch, W_dec.shape[0])
        if offsets is not None:
            layout.offsets = offsets  # fills the cached property
    with no_autocast(W_dec.device):
        if torch.is_grad_enabled() and (vals.requires_grad or W_dec.requires_grad):
            return SparseDecode.apply(vals.to(W_dec.dtype), W_dec, layout)
        return _embedding_decode(layout, vals, W_dec)
