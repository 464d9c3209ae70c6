"""The sparse autoencoder: linear encoder, pluggable activation, linear decoder. No loss inside.

π(x) = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc,   f = σ(π),   x̂ = f W_dec + b_dec

Weights use the SAELens orientation: W_enc [d_in, d_sae], W_dec [d_sae, d_in] (rows are latent
directions), so exports need no transposes.

Mixed precision (`trainer.precision=bf16-mixed`, i.e. the step under `torch.autocast(device, bfloat16)`)
does what sparsify does on GPU (fp32 parameters, its forward under bf16 autocast): the encoder product π
is bf16 (autocast's `addmm`, bias included, as sparsify's `F.linear`) and the activation selects on it;
what leaves the encoder (the selected values, or the dense π upcast before a dense activation) is in the
parameter dtype, and the decoder runs with autocast off, so x̂ and every loss term read fp32 tensors.
`SAEOutput.x` is the fp32 input. Autocast never changes a parameter's dtype, so the optimiser state,
checkpoints and exports stay fp32. On the sparse path the bf16 product is nearly all of the step's
FLOPs (2·batch·d_in·d_sae, against ~8·batch·k·d_in for the decoder and both backwards), so it is the
part that gains; the sparse decoder and the CSR backward are memory-bound (and the CSR products have no
bf16 CPU kernels), and in fp32 they keep the gradients of W_dec and W_enc fp32 sums. On the dense path
(ReLU, JumpReLU) the gradient to W_enc flows back through the bf16 product, as autocast differentiates it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from saelab.files import CorruptFile, load_safetensors, read_json
from saelab.kernels import (
    ColumnEncode,
    ScreenStats,
    SparseLayout,
    autocast_on,
    no_autocast,
    screen_applies,
    sparse_decode,
    sparse_encode,
)
from saelab.types import SAEOutput, SparseCodes

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class SAE(nn.Module):
    """A sparse autoencoder over activations of width `d_in` with `d_sae` latents.

    Args:
        d_in: input width (the host's hidden size at the hook point).
        d_sae: number of latents.
        activation: one of `saelab.sae.activations` (ReLU, TopK, BatchTopK, JumpReLU).
        apply_b_dec_to_input: subtract b_dec before encoding (SAELens `apply_b_dec_to_input`).
        normalize_decoder: keep decoder rows at unit norm; the trainer also removes the gradient
            component parallel to each row before every optimiser step.
        init_encoder_as_decoder_t: initialise W_enc = W_decᵀ (Gao et al. 2024).
        decoder_init_norm: norm of the initial decoder rows (1.0; 0.1 is the Anthropic heuristic).
        b_dec_init: "geometric_median", "mean" or "zeros"; data-dependent inits are applied by the
            trainer on the first batch (`init_b_dec`).
        init_from: a saelab/SAELens export directory whose weights initialise this SAE (fine-tuning).
        seed: seed of the weight initialisation, independent of the global RNG.
        dtype: parameter dtype.
    """

    b_dec_initialized: Tensor  # bool buffer

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        activation: nn.Module,
        apply_b_dec_to_input: bool = True,
        normalize_decoder: bool = True,
        init_encoder_as_decoder_t: bool = True,
        decoder_init_norm: float = 1.0,
        b_dec_init: str = "geometric_median",
        init_from: str | None = None,
        seed: int = 0,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if d_in is None or int(d_in) < 1:
            raise ValueError(
                f"SAE needs a positive d_in, got {d_in!r}: set data.d_in (or sae.d_in) to the activation width."
            )
        if d_sae < 1:
            raise ValueError(f"SAE needs d_sae >= 1, got {d_sae}.")
        if b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, got {b_dec_init!r}.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        self.activation = activation
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.normalize_decoder = normalize_decoder
        self.b_dec_init = b_dec_init
        dt = _DTYPES[dtype]

        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(self.d_sae, self.d_in, generator=g, dtype=torch.float32)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * decoder_init_norm
        W_enc = (
            W_dec.t().clone()
            if init_encoder_as_decoder_t
            else torch.randn(self.d_in, self.d_sae, generator=g)
        )
        if not init_encoder_as_decoder_t:
            W_enc = W_enc / W_enc.norm(dim=0, keepdim=True) * decoder_init_norm
        self.W_enc = nn.Parameter(W_enc.to(dt))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(W_dec.to(dt))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, dtype=dt))
        # False until b_dec has been set from data (or loaded): saved, so a resumed run does not redo it.
        self.register_buffer("b_dec_initialized", torch.tensor(b_dec_init == "zeros"))
        if init_from is not None:
            self.load_weights(init_from)

    # ------------------------------------------------------------------ forward
    def encode_pre(self, x: Float[Tensor, "batch d_in"], latents: Int[Tensor, " n"] | None = None) -> Tensor:
        """Pre-activations π for all latents, or only for `latents` (with gradient).

        Under autocast one bf16 `addmm` (bias added before the rounding to bf16, like the sparse path's π
        and sparsify's `F.linear`); otherwise the parameter dtype. For `latents` (AuxK's dead ones) the
        product is `kernels.ColumnEncode`'s: the same values, with a cheaper backward.
        """
        if latents is not None:
            # AuxK's dead latents: dense, with a gradient that skips a [batch, d_in] product
            b_dec = self.b_dec if self.apply_b_dec_to_input else None
            mixed = autocast_on(x.device)
            dtype = torch.get_autocast_dtype(x.device.type) if mixed else self.W_enc.dtype
            return ColumnEncode.apply(x, b_dec, self.W_enc, self.b_enc, latents, dtype)
        x_in = x - self.b_dec if self.apply_b_dec_to_input else x
        if autocast_on(x.device):
            return torch.addmm(self.b_enc, x_in, self.W_enc)  # (batch, d_sae) bf16
        return x_in @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        """Dense latent codes f(x)."""
        return self(x).codes

    def decode(self, codes: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_in"]:
        """x̂ = f W_dec + b_dec in the parameter dtype, with autocast off."""
        with no_autocast(codes.device):
            return codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def check_input(self, x: Tensor) -> None:
        """One clear message when the data width and `sae.d_in` disagree."""
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"SAE expects inputs of width d_in={self.d_in}, got {tuple(x.shape)}: "
                "the data source and sae.d_in disagree."
            )

    def forward(self, x: Float[Tensor, "batch d_in"]) -> SAEOutput:
        """Encode, activate, decode. The dense path's π and codes, and `x_hat`, are in the parameter dtype
        also under autocast; the sparse path's `pre_acts` (detached) is then bf16."""
        self.check_input(x)
        x = x.to(self.W_enc.dtype)  # the input the loss reads: in the parameter dtype, never a bf16 copy
        if not getattr(self.activation, "sparse", False):
            pre = self.encode_pre(x).to(x.dtype)  # a bf16 π (autocast) upcast exactly, with gradient
            codes = self.activation(pre)
            return SAEOutput(x=x, x_hat=self.decode(codes), pre_acts=pre, dense=codes)
        vals, layout, pre = self._sparse_encode(x)
        x_hat = (
            sparse_decode(layout.rows, layout.cols, vals, self.W_dec, x.shape[0], layout=layout) + self.b_dec
        )
        sparse = SparseCodes(rows=layout.rows, cols=layout.cols, vals=vals, offsets=layout.offsets)
        return SAEOutput(x=x, x_hat=x_hat, pre_acts=pre, sparse=sparse, d_sae=self.d_sae)

    def _sparse_encode(self, x: Tensor) -> tuple[Tensor, SparseLayout, Tensor]:
        # b_dec goes in separately so the backward can form its gradient as −W_enc·colsum(∂L/∂π)
        # instead of a [batch, d_in] product (see kernels.SparseEncode)
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        act = self.activation
        screen = getattr(act, "screen", False)  # a per-row TopK's setting; other selections are not screened
        k = int(getattr(act, "k", 0))
        policy = getattr(act, "screen_policy", None) if screen is None else None  # auto: screen while it pays
        screened = screen_applies(screen, self.W_enc, k) and (policy is None or policy.wants())
        if not screened:
            return sparse_encode(x, b_dec, self.W_enc, self.b_enc, act.select)
        hard = ScreenStats.retried + ScreenStats.fallback
        out = sparse_encode(x, b_dec, self.W_enc, self.b_enc, act.select, screen_k=k)
        if policy is not None:
            policy.record(x.shape[0], ScreenStats.retried + ScreenStats.fallback - hard)
        return out

    # ------------------------------------------------------------------ constraints and init
    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        if self.normalize_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of ∂L/∂W_dec[j] its component along W_dec[j], so the unit-norm step is a rotation."""
        if not self.normalize_decoder or self.W_dec.grad is None:
            return
        W, grad = self.W_dec, self.W_dec.grad
        # g_j ← g_j − (⟨g_j, w_j⟩ / ‖w_j‖²) w_j: row dots, row norms and one in-place update
        coeff = torch.linalg.vecdot(grad, W, dim=1) / W.norm(dim=1).clamp_min(1e-8).square()
        grad.addcmul_(W, coeff.unsqueeze(1), value=-1.0)

    @torch.no_grad()
    def init_b_dec(self, x: Float[Tensor, "n d_in"]) -> None:
        """Set b_dec from a data sample (geometric median or mean), once."""
        if bool(self.b_dec_initialized):
            return
        self.check_input(x)
        x = x.to(torch.float32)
        center = geometric_median(x) if self.b_dec_init == "geometric_median" else x.mean(0)
        self.b_dec.copy_(center.to(self.b_dec.dtype))
        self.b_dec_initialized.fill_(True)

    # ------------------------------------------------------------------ io
    def load_weights(self, path: str | Path) -> None:
        """Load W_enc/b_enc/W_dec/b_dec (and a threshold) from an export directory or a safetensors file.

        An export whose `cfg.json` records a folded input scale s (`FOLDED_SCALE_KEY`; saelab writes one for
        SAEs trained on s·h) holds weights that read h; they are loaded back in the units of training, s·h.
        A recorded sha256 of the weights (`WEIGHTS_SHA256_KEY`) is checked first (see `read_export`).
        """
        export = read_export(path)
        self.set_weights(export.weights, export.file)

    @torch.no_grad()
    def set_weights(self, sd: dict[str, Tensor], source: Path) -> None:
        """Copy a state dict in SAELens orientation (and a `threshold`) into this SAE; `source` names the file
        in the error when a shape differs."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if sd[name].shape != getattr(self, name).shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(sd[name].shape)}, this SAE has {tuple(getattr(self, name).shape)}; "
                    "match sae.d_sae and data.d_in to the checkpoint."
                )
            if not bool(torch.isfinite(sd[name]).all()):
                raise ValueError(
                    f"{source}: {name} holds NaN or infinite values; the file is damaged or came from a "
                    "diverged run: export a checkpoint from before the divergence."
                )
            getattr(self, name).data.copy_(sd[name])
        if "threshold" in sd and hasattr(self.activation, "threshold"):
            th = self.activation.threshold
            log_th = getattr(self.activation, "log_threshold", None)  # JumpReLU's parameter
            if isinstance(th, torch.Tensor) and th.ndim == 0:  # BatchTopK's buffer itself
                th.copy_(sd["threshold"].max())
            elif isinstance(log_th, torch.Tensor):
                log_th.data.copy_(sd["threshold"].clamp_min(1e-12).log())
        self.b_dec_initialized.fill_(True)


# `cfg.json` metadata key of the input scale s folded into an export's weights (see `rescale_inputs`)
FOLDED_SCALE_KEY = "saelab_folded_scale"
# `cfg.json` metadata key of the sha256 of the export's weights file, checked on every load
WEIGHTS_SHA256_KEY = "saelab_weights_sha256"
WEIGHTS_FILE = "sae_weights.safetensors"  # the SAELens weights file beside cfg.json


def rescale_inputs(sd: dict[str, Tensor], c: float) -> dict[str, Tensor]:
    """The state dict of the same SAE for inputs multiplied by c > 0: b_enc, b_dec and threshold times c.

    π(c·x) computed with the rescaled biases is c·π(x), and ReLU, TopK, BatchTopK and JumpReLU (with its
    threshold rescaled) are positively homogeneous, so the rescaled SAE gives codes c·f and reconstruction
    c·x̂ for input c·x; W_enc and W_dec are unchanged, so decoder rows keep unit norm. c = 1/s turns an SAE
    trained on s·h into one that reads h (dictionary_learning rescales its biases the same way).
    """
    if c == 1.0:
        return sd
    if not c > 0:
        raise ValueError(f"an input scale must be positive, got {c}.")
    return {k: v * c if k in ("b_enc", "b_dec", "threshold") else v for k, v in sd.items()}


def fix_export(folder: Path) -> str:
    """What to do about a damaged or inconsistent export in `folder`."""
    return f"Re-export the SAE, or delete {folder} and point the config at another export."


def read_cfg(cfg_file: Path) -> dict[str, Any]:
    """An export's `cfg.json` as a dict (its `metadata` a dict too); damaged JSON raises `CorruptFile`."""
    cfg = read_json(cfg_file, fix_export(cfg_file.parent))
    if not isinstance(cfg, dict) or not isinstance(cfg.get("metadata") or {}, dict):
        raise CorruptFile(
            f"{cfg_file}: expected a JSON object with a `metadata` object. {fix_export(cfg_file.parent)}"
        )
    return cfg


def scale_of(fields: dict[str, Any], cfg_file: Path) -> float:
    """The folded input scale recorded in `fields` (`FOLDED_SCALE_KEY`), 1.0 when none; a value that is not
    a positive number raises `CorruptFile` naming the file and the field."""
    value = fields.get(FOLDED_SCALE_KEY)
    if value is None:
        return 1.0
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise CorruptFile(
            f"{cfg_file}: {FOLDED_SCALE_KEY}={value!r} is not a positive number. {fix_export(cfg_file.parent)}"
        )
    return float(value)


class Export(NamedTuple):
    """An export read back: its `cfg.json` ({} when there is none), its weights in the units of training
    (a folded input scale multiplied back in) and the weights file."""

    cfg: dict[str, Any]
    weights: dict[str, Tensor]
    file: Path


def read_export(path: str | Path) -> Export:
    """Read an export directory (`cfg.json` + `sae_weights.safetensors`) or a bare safetensors file.

    Damaged JSON or safetensors, and weights whose sha256 differs from the one `cfg.json` records
    (`WEIGHTS_SHA256_KEY`; exports written by SAELens or an older saelab have none and load unchecked),
    raise `CorruptFile` with the path and what to do. SAELens before 6.0 stored log θ; it becomes θ.
    """
    p = Path(path)
    f = p / WEIGHTS_FILE if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"No SAE weights at {f}; point sae.init_from at an export directory.")
    cfg_file = f.parent / "cfg.json"
    cfg = read_cfg(cfg_file) if cfg_file.exists() else {}
    meta = cfg.get("metadata") or {}
    sha = meta.get(WEIGHTS_SHA256_KEY) if f.name == WEIGHTS_FILE else None  # it is the digest of that file
    sd = load_safetensors(f, fix_export(f.parent), sha256=sha)
    if "log_threshold" in sd and "threshold" not in sd:
        sd["threshold"] = sd.pop("log_threshold").exp()
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in sd]
    if missing:
        raise CorruptFile(f"{f} lacks {', '.join(missing)}. {fix_export(f.parent)}")
    return Export(cfg, rescale_inputs(sd, scale_of(meta, cfg_file)), f)


@torch.no_grad()
def geometric_median(x: Float[Tensor, "n d"], iters: int = 100, tol: float = 1e-6) -> Float[Tensor, " d"]:
    """Weiszfeld's algorithm: argmin_y Σ_i ‖x_i − y‖ (the b_pre init of Gao et al. 2024)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * (y.norm() + tol):
            return y_new
        y = y_new
    return y
