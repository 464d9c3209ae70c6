"""Several SAEs trained in one Lightning fit on the same activation batches: `LitMultiSAE`.

A sweep over k, widths or loss coefficients trains SAEs that differ only in themselves: each reads the
same activations. Trained one fit per SAE, a sweep pays the host forward (or the cache read) once per SAE
and batch; trained together it pays it once per batch. dictionary_learning's `trainSAE` takes a list of
trainer configs for this reason and updates every trainer on each activation batch of one buffer, and
SAELens's multi-SAE runner feeds one activation store to several SAEs. Here:

- `LitMultiSAE` holds one `LitSAE` per SAE and runs each member's own step (`LitSAE.train_step`: b_dec
  init, forward, objective with its own `TrainState`, dead-latent count) on every batch. Each member keeps
  its SAE, objective, optimiser, LR schedule, dead-latent counter, validation metrics and health record;
  its metrics are logged under `<name>/` (`k16/loss/total`, `k16/metrics/explained_variance`, `k16/lr`).
  Its state dict (so every checkpoint) holds every member, and `on_save_checkpoint` adds their schedules.
- `MultiOptimizer` hands Lightning the members' optimisers as one. Lightning counts `global_step` in
  optimiser steps, and its automatic optimisation takes one optimiser; in manual optimisation every
  `step()` of N optimisers adds a step, so `max_steps`, checkpoint intervals and resume would count N per
  batch. With one optimiser outside and one per SAE inside, a step stays a batch, and Lightning's
  automatic loop (zero_grad, backward, precision, the clipping hook) runs as it does for one SAE.

Parity: each member ends with the weights, bit for bit, that a single-SAE `train.fit` of its config gives
on the same batches (tests/test_multi.py). What makes them so: the members are built from their own
configs as `instantiate(cfg.sae)` builds them alone (SAE init has its own seeded generator); each step
runs the same `LitSAE.train_step` with the trainer's step; the summed loss sends the gradient 1 to each
member's loss, so each backward is the one its own loss would get (the members share no parameter); then,
in the order of a single fit: the parallel decoder gradient removed (`LitSAE.on_after_backward`),
gradients clipped per SAE (`configure_gradient_clipping`: each member's norm over its own parameters),
the optimiser step, the decoder renormalised (as `LitSAE.optimizer_step`), the schedule stepped (Lightning
steps a single fit's schedule after the optimiser step, before the batch-end callbacks).

Costs: the members' autograd graphs are alive together until the one backward (peak memory is their
sum); under fp16 loss scaling an inf in one SAE skips the step of all (saelab's trainer configs use fp32
and bf16, which scale nothing). The config side (one source, one Trainer, what SAEs may differ in, the
export and evaluation of each) is `saelab.recipes.multi`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from saelab.eval.base import batch_acts
from saelab.lit import LitSAE, log_scalars


class MultiOptimizer:
    """The optimisers of several SAEs as one optimiser for Lightning (see the module docstring for why).

    `step` runs the closure (forward and backward of all SAEs) once, then each optimiser's step in turn;
    `state_dict` holds each optimiser's state under its SAE's name. `param_groups` are the optimisers' own
    group dicts, so an SAE's schedule changing its learning rate shows here as well.
    """

    def __init__(self, optimizers: Mapping[str, Optimizer]) -> None:
        self.optimizers = dict(optimizers)
        self.defaults: dict[str, Any] = {}
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:
        """Every parameter's state (the optimisers' own per-parameter dicts, so moving them moves those)."""
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():  # as torch's optimisers run a closure
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(
                f"the checkpoint holds optimiser states of the SAEs {sorted(state_dict)}, this fit trains "
                f"{sorted(self.optimizers)}: resume with the SAEs of the run that wrote it."
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


class LitMultiSAE(pl.LightningModule):
    """Trains each `LitSAE` of `members` ({name: LitSAE}) on every batch (see the module docstring).

    Lightning sees this module only: the members are not attached to the trainer, so they take the step
    from here (`LitSAE.train_step(x, step)`) and return what to log, which is logged here under `<name>/`.
    """

    members: Mapping[str, LitSAE]

    def __init__(self, members: Mapping[str, LitSAE]) -> None:
        super().__init__()
        if not members:
            raise ValueError("LitMultiSAE needs at least one SAE.")
        self.members = torch.nn.ModuleDict(dict(members))  # type: ignore[assignment]
        self.optimizers_by_name: dict[str, Optimizer] = {}
        self.schedulers: dict[str, Any] = {}  # {name: LR scheduler} for the members that have one
        self._scheduler_states: dict[str, Any] | None = None  # from a checkpoint, until training starts
        self.bar_metrics: dict[str, Tensor] = {}  # each SAE's loss, for the progress bar

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x = batch_acts(batch)
        step = self.global_step
        total: Tensor | None = None
        scalars: dict[str, Tensor | float] = {}
        for name, lit in self.members.items():
            loss, logs = lit.train_step(x, step)
            total = loss if total is None else total + loss  # d total / d loss = 1 for every member
            if step % lit.log_every == 0:
                # the rate this step's update uses (the schedule moves it after the update)
                lr = float(self.optimizers_by_name[name].param_groups[0]["lr"])
                scalars |= {f"{name}/{k}": v for k, v in logs.items()} | {f"{name}/lr": lr}
            self.bar_metrics[f"{name}/loss"] = logs["loss/total"]
        log_scalars(self, scalars, step)
        assert total is not None
        return total

    def on_after_backward(self) -> None:
        for lit in self.members.values():
            lit.on_after_backward()  # the decoder gradient parallel to each row removed

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # per SAE: each norm over one SAE's parameters, as its own fit clips them (not over all SAEs)
        for opt in self.optimizers_by_name.values():
            self.clip_gradients(opt, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for name, lit in self.members.items():
            lit.sae.set_decoder_norm_to_unit()  # as LitSAE.optimizer_step, before any callback
            if name in self.schedulers:  # as Lightning steps a single fit's "step" schedule
                self.schedulers[name].step()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx: int) -> None:
        for lit in self.members.values():
            lit.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        logs: dict[str, Tensor] = {}
        for name, lit in self.members.items():
            where = f"for SAE {name} at the validation of step {self.global_step}"
            val = lit.end_validation(self.trainer.sanity_checking, where)
            logs |= {f"{name}/{k}": v for k, v in val.items()}
        self.log_dict(logs, sync_dist=True)  # computed over all ranks already, as in LitSAE

    # ------------------------------------------------------------------ optimiser and checkpoint
    def configure_optimizers(self):
        self.optimizers_by_name, self.schedulers = {}, {}
        for name, lit in self.members.items():
            conf = lit.configure_optimizers()  # the optimiser and schedule the SAE's own fit would have
            if isinstance(conf, dict):
                self.optimizers_by_name[name] = conf["optimizer"]
                self.schedulers[name] = conf["lr_scheduler"]["scheduler"]
            else:
                self.optimizers_by_name[name] = conf
        # the schedules are stepped here (optimizer_step) and saved here (on_save_checkpoint): Lightning
        # accepts only schedules of the optimisers it is given, and these belong to the inner ones
        return MultiOptimizer(self.optimizers_by_name)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["saelab_multi_schedulers"] = {n: s.state_dict() for n, s in self.schedulers.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # called before configure_optimizers builds the schedules: kept until training starts
        self._scheduler_states = checkpoint.get("saelab_multi_schedulers")

    def on_train_start(self) -> None:
        states, self._scheduler_states = self._scheduler_states, None
        if states is None:
            return
        if set(states) != set(self.schedulers):
            raise ValueError(
                f"the checkpoint holds LR schedules of the SAEs {sorted(states)}, this fit has schedules for "
                f"{sorted(self.schedulers)}: resume with the settings of the run that wrote it."
            )
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(states[name])
