"""The evaluator interface: an SAE and an activation source in, named metrics (plus tables, figures) out.

An evaluator is a small callable object, built by Hydra from `conf/eval/metrics/<name>.yaml` the way a
loss term is built from `conf/objective/terms/`, so `eval/metrics=[core,geometry,spliced]` needs no code:

    result = evaluator(sae, source, out_dir)        # -> EvalResult

`source` is an activation datamodule (or any object with the attributes the evaluator names in
`needs`); `out_dir` is where it may write PNGs. An evaluator whose needs the source does not meet is
skipped with one line saying why (`applies`), so a default set such as `[core, geometry, recovery]`
suits every source and ground-truth metrics appear wherever ground truth exists.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from saelab.types import SAELike, SAEOutput


@dataclass(frozen=True)
class Table:
    """A titled table: what report.md, the terminal and W&B show."""

    headers: list[str]
    rows: list[list]


@dataclass
class EvalResult:
    """Named scalar metrics, plus optional tables, figures (PNG paths), JSON data and in-memory objects.

    `metrics` keys are bare names (`l0`, `ce_loss_score`); the stage or report adds a namespace
    (`eval/`, `domain/`). `data` goes to results.json as is (so everything a figure shows is there too);
    `objects` are Python values for later analyses in the same process (never serialised).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: EvalResult) -> EvalResult:
        for name in ("metrics", "tables", "figures", "data", "objects"):
            clash = set(getattr(self, name)) & set(getattr(other, name))
            if clash:
                raise ValueError(f"two evaluators both report {name} {sorted(clash)}; rename one.")
            getattr(self, name).update(getattr(other, name))
        return self


@runtime_checkable
class Evaluator(Protocol):
    """What every evaluator provides: a name, the source attributes it needs, and the call."""

    name: str
    needs: tuple[str, ...]

    def __call__(self, sae: SAELike, source: Any, out_dir: Path) -> EvalResult: ...


def applies(evaluator: Evaluator, source: Any) -> str | None:
    """None when `source` has everything `evaluator` needs, else the reason it is skipped.

    An evaluator that suits several kinds of source (no single attribute list says which) defines
    `applies_to(source) -> str | None` instead: None when it applies, else why not. When present it is
    asked in place of checking `needs`.
    """
    check = getattr(evaluator, "applies_to", None)
    if callable(check):
        reason = check(source)
        return None if reason is None else f"{evaluator.name}: {reason}"
    missing = [a for a in evaluator.needs if getattr(source, a, None) is None]
    if missing:
        return f"{evaluator.name}: the source {type(source).__name__} has no {', '.join(missing)}"
    return None


def evaluate(
    sae: SAELike,
    source: Any,
    evaluators: Mapping[str, Evaluator] | Sequence[Evaluator],
    out_dir: str | Path,
    quiet: bool = False,
) -> EvalResult:
    """Run each evaluator that applies to `source`, in order, and merge their results (SAE in eval mode)."""
    items = evaluators.values() if isinstance(evaluators, Mapping) else evaluators
    out_dir = Path(out_dir)
    out = EvalResult()
    module = sae if isinstance(sae, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        for ev in items:
            reason = applies(ev, source)
            if reason is not None:
                if not quiet:
                    print(f"saelab: skipped evaluator {reason}")
                continue
            out.merge(ev(sae, source, out_dir))
    finally:
        if module is not None:
            module.train(was_training)
    return out


def batch_acts(batch) -> Tensor:
    """The [batch, d_in] activations of a batch: the tensor itself, or its "acts" entry."""
    if isinstance(batch, Mapping):
        return batch["acts"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def take(batches: Iterable, n: int | None) -> Iterable:
    """The first n batches (all when n is None)."""
    for i, b in enumerate(batches):
        if n is not None and i >= n:
            return
        yield b


def fired_counts(out: SAEOutput, d_sae: int) -> Tensor:
    """How many rows of the batch each latent fires on, [d_sae]."""
    if out.sparse is not None:
        nz = out.sparse.vals != 0
        return torch.bincount(out.sparse.cols[nz], minlength=d_sae)
    return (out.codes != 0).sum(0)


class Rescaled(nn.Module):
    """An SAE trained on s·x presented to a host in x's units: x̂(x) = sae(s·x).x̂ / s.

    Datamodules that normalise their inputs (E‖s·x‖² = d_in, SAELens's activation-norm scaling) record s
    as `act_scale`; splicing evaluators wrap the SAE in this so the host sees activations at its own scale.
    """

    def __init__(self, sae: SAELike, scale: float) -> None:
        super().__init__()
        self.sae, self.scale = sae, float(scale)
        self.d_in, self.d_sae = sae.d_in, sae.d_sae

    def forward(self, x: Tensor) -> SAEOutput:
        out = self.sae(x * self.scale)
        return SAEOutput(
            x=x,
            x_hat=out.x_hat / self.scale,
            pre_acts=out.pre_acts,
            dense=out.dense,
            sparse=out.sparse,
            d_sae=out.d_sae,
        )


def in_host_units(sae: SAELike, source: Any) -> nn.Module:
    """`sae` wrapped by `Rescaled` when the source normalised its activations, else `sae` itself."""
    if not isinstance(sae, nn.Module):
        raise TypeError(f"splicing an SAE into a host needs a torch module, got {type(sae).__name__}.")
    s = float(getattr(source, "act_scale", 1.0) or 1.0)
    return sae if s == 1.0 else Rescaled(sae, s)


def at_k(sae: SAELike, k: int) -> SAELike:
    """A view of a TopK-family SAE that keeps k latents per row, sharing its weights; `sae` is untouched.

    The view is a shallow copy whose `activation` is a shallow copy with another `k`; parameters and
    buffers are the same tensors, so nothing is copied and the original keeps its own k.
    """
    act = getattr(sae, "activation", None)
    if (
        act is None
        or not hasattr(act, "k")
        or not isinstance(sae, nn.Module)
        or "activation" not in sae._modules
    ):
        raise ValueError(f"{type(sae).__name__} has no TopK-style activation with a k to change.")
    new_act = copy.copy(act)
    new_act.k = int(k)
    view = copy.copy(sae)
    view._modules = {**sae._modules, "activation": new_act}  # a new dict: the original's stays as it is
    return view


def prefix(sae: SAELike, m: int) -> Any:
    """The sub-SAE of the first `m` latents (a Matryoshka SAE's nested dictionary), as a new SAE.

    Encoder columns, encoder bias, decoder rows and any per-latent activation state are sliced to [0, m);
    b_dec is shared. For activations that select by a threshold (ReLU, JumpReLU, BatchTopK at inference)
    the prefix's codes are exactly the first m codes of the full SAE, so its reconstruction is the
    Matryoshka x̂_m. A TopK prefix picks its own k among the first m latents.
    """
    from saelab.sae import SAE  # the evaluators take any SAELike; only this view needs the class

    if not isinstance(sae, SAE):
        raise TypeError(f"a prefix view needs a saelab SAE, got {type(sae).__name__}.")
    m = int(m)
    if not 1 <= m <= sae.d_sae:
        raise ValueError(f"prefix size must be in [1, d_sae={sae.d_sae}], got {m}.")
    act = copy.deepcopy(sae.activation)
    with torch.no_grad():
        for name, p in list(act.named_parameters(recurse=False)) + list(act.named_buffers(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == sae.d_sae:
                sliced = p[:m].clone()
                setattr(act, name, nn.Parameter(sliced) if isinstance(p, nn.Parameter) else sliced)
    view = SAE(
        sae.d_in,
        m,
        act,
        apply_b_dec_to_input=sae.apply_b_dec_to_input,
        normalize_decoder=sae.normalize_decoder,
        b_dec_init="zeros",
    ).to(sae.W_dec.device, sae.W_dec.dtype)
    with torch.no_grad():
        view.W_enc.copy_(sae.W_enc[:, :m])
        view.b_enc.copy_(sae.b_enc[:m])
        view.W_dec.copy_(sae.W_dec[:m])
        view.b_dec.copy_(sae.b_dec)
    return view.eval().requires_grad_(False)
