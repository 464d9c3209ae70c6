"""The objective: a named sum of loss terms, chosen from config (`objective/terms=[mse,auxk]`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from saelab.objectives.terms import Term
from saelab.types import SAELike, SAEOutput, TrainState


class NonFiniteLossError(RuntimeError):
    """A loss term produced NaN or ±inf."""


class Objective:
    """Σ_name weight_name(state) · term_name(out, sae, state); each raw value is reported as `loss/<name>`."""

    def __init__(self, terms: Mapping[str, Term]) -> None:
        if not terms:
            raise ValueError("the objective has no terms: choose some, e.g. objective/terms=[mse,auxk].")
        self.terms = dict(terms)

    def __call__(self, out: SAEOutput, sae: SAELike, state: TrainState) -> tuple[Tensor, dict[str, Tensor]]:
        total = out.x_hat.new_zeros(()).float()
        logs: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            value = term(out, sae, state)
            if not torch.isfinite(value):
                raise NonFiniteLossError(
                    f"loss/{name} is {value.item()} at step {state.step}: lower optim.optimizer.lr, check "
                    f"the input scale (data normalisation), or lower objective.terms.{name}.coeff."
                )
            logs[f"loss/{name}"] = value.detach()
            total = total + term.weight(state) * value
        logs["loss/total"] = total.detach()
        return total, logs

    def __repr__(self) -> str:
        return f"Objective({self.terms})"
