"""`LitSAE`: the LightningModule where an SAE meets its objective.

One training step reads top to bottom: x → sae(x) → objective(out, sae, state) → backward; around it
the module owns what belongs to training, not to the model: the dead-latent token counter, the
unit-norm decoder constraint (with the parallel gradient removed), b_dec's data-dependent init and
metric logging. Validation streams L0 / explained variance over the val set.

Dead latents have one definition (`saelab.resolvers`): silent on the last `dead_window_tokens` tokens. The
training counter applies it to the training stream (`sparsity/dead_frac`, and the set AuxK sees); the
`core` evaluator applies it to the trained SAE over the same number of tokens. The few validation batches
between steps are far fewer tokens than the window, so they report no dead fraction (a latent silent on
4k tokens is not dead); they only tell the divergence check whether any latent still fires.

Under DDP every rank must hold one model. DDP broadcasts parameters and buffers from rank 0 when it
wraps the module and averages gradients, so whatever the module changes outside the gradient must agree
across ranks by construction: b_dec's init reads the first batch of *every* rank (gathered) and is then
broadcast from rank 0; the dead-latent counter counts the tokens and firings of all ranks; and floating
buffers that a forward updates from its own batch (BatchTopK's threshold) are averaged after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytorch_lightning as pl
import torch
from jaxtyping import Float
from torch import Tensor
from torch.optim import Optimizer

from saelab import health
from saelab.eval.base import batch_acts
from saelab.eval.metrics import L0, DeadFraction, ExplainedVariance
from saelab.objectives import Objective
from saelab.sae import SAE, ResidualSAE
from saelab.types import SAEOutput, TrainState


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def end_distributed() -> None:
    """Destroy the default process group, if one is up, before the interpreter exits.

    A gloo group left to interpreter shutdown can abort a rank whose work is all done ("terminate called
    without an active exception", SIGABRT), which a scheduler then reports as a failed job.
    """
    if _distributed():
        torch.distributed.destroy_process_group()


def _gather_rows(x: Tensor) -> Tensor:
    """The rows of every rank's x, concatenated in rank order (ranks may hold different row counts)."""
    dist = torch.distributed
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def log_scalars(module: pl.LightningModule, logs: Mapping[str, Tensor | float], step: int) -> None:
    """Send one step's training scalars straight to the trainer's loggers, at optimiser step `step`.

    Not `LightningModule.log`: each of its calls re-registers the key and moves the whole result store to
    the value's device, about a millisecond on CPU, which on a small SAE is several percent of a step.
    Training scalars need nothing it adds (epoch reduction, cross-rank sync); as `self.log` without
    `sync_dist` does, this logs rank 0's values. Validation still goes through `self.log`.
    """
    if not logs or not module.loggers or module.global_rank != 0:  # no loggers: not attached to a trainer
        return
    flat = [torch.as_tensor(v).detach().reshape(()).float().cpu() for v in logs.values()]
    values = dict(zip(logs, torch.stack(flat).tolist()))
    for logger in module.loggers:
        logger.log_metrics(values, step=step)


def compile_backend(setting: bool | str | None) -> str | None:
    """The `torch.compile` backend `lit.compile` asks for: None (eager) for false, "inductor" for true, else
    the backend named, which must be one torch knows."""
    if setting is None or setting is False or str(setting).lower() in ("false", "none", "off"):
        return None
    if setting is True or str(setting).lower() in ("true", "on"):
        return "inductor"
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if setting not in known:
        raise ValueError(
            f"lit.compile={setting!r} is not a torch.compile backend: use false, true (inductor) or one of "
            f"{', '.join(sorted(known))}."
        )
    return str(setting)


def learning_rates(optimizer: Optimizer) -> dict[str, float]:
    """The rate the next update of each of `optimizer`'s parameter groups uses, under the names Lightning's
    `LearningRateMonitor` gives them: `lr-<Optimizer>`, or `lr-<Optimizer>/<group name or pg<i>>` (i from 1)
    where there are several groups.

    `LitSAE` logs these with the step's other scalars (`log_scalars`) instead of through that callback,
    which runs on every step and, with W&B, makes each logged step a second history row.
    """
    name, groups = f"lr-{type(optimizer).__name__}", optimizer.param_groups
    if len(groups) == 1:
        return {name: float(groups[0]["lr"])}
    return {f"{name}/{g.get('name', f'pg{i}')}": float(g["lr"]) for i, g in enumerate(groups, start=1)}


class LitSAE(pl.LightningModule):
    """Trains `sae` on `objective`.

    Args:
        sae: the SAE module (`saelab.sae.SAE` or `ResidualSAE`).
        objective: the `Objective` (named loss terms).
        optimizer: a partial optimiser constructor, called with the trainable parameters.
        scheduler: optional partial LR scheduler constructor, called with the optimiser (stepped per step).
        dead_window_tokens: a latent is dead once it has not fired for this many training tokens (Gao et al.);
            the config's default is a tenth of the run (`saelab.resolvers.dead_window`).
        seed: seeds the per-step randomness of loss terms (random chunks, prefixes).
        log_every: log training scalars every n steps.
        on_degenerate: "warn" or "stop" when the run diverges or cannot become sparse (`saelab.health`).
        compile: run the SAE's forward through `torch.compile` (True: the inductor backend; or a backend's
            name, e.g. "aot_eager"); False runs it eagerly. See `forward_sae`.
    """

    sae: SAE | ResidualSAE
    tokens_since_fired: Tensor  # long buffer [d_sae]
    fired_since_density: Tensor  # long buffer [d_sae], not checkpointed (saelab.dashboards)

    def __init__(
        self,
        sae: SAE | ResidualSAE,
        objective: Objective,
        optimizer: Callable,
        scheduler: Callable | None = None,
        dead_window_tokens: int = 10_000_000,
        seed: int = 0,
        log_every: int = 10,
        on_degenerate: str = "warn",
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.sae, self.objective = sae, objective
        self.compile_backend = compile_backend(compile)
        # built at the first forward; a function, not a module, so not in the state dict
        self._compiled: Callable | None = None
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.dead_window_tokens, self.seed, self.log_every = (
            int(dead_window_tokens),
            int(seed),
            int(log_every),
        )
        # tokens since each latent last fired; part of the state dict, so resume keeps it
        self.register_buffer("tokens_since_fired", torch.zeros(sae.d_sae, dtype=torch.long))
        self.bar_metrics: dict[str, Tensor] = {}  # what the progress bar shows (saelab.train.StepProgressBar)
        # this rank's firings and tokens since the last density histogram, which saelab.dashboards reads and
        # resets; not in the state dict: a resumed fit starts a new window
        density = torch.zeros(sae.d_sae, dtype=torch.long)
        self.register_buffer("fired_since_density", density, persistent=False)
        self.tokens_since_density = 0
        self.val_l0, self.val_ev = L0(), ExplainedVariance(sae.d_in)
        self.val_silent = DeadFraction(sae.d_sae)  # latents that fire on no validation token
        self.on_degenerate = health.check_mode(on_degenerate)
        self.health_warnings: list[str] = []  # what `saelab.health` flagged in this fit, for the report

    # ------------------------------------------------------------------ training
    def forward_sae(self, x: Tensor) -> SAEOutput:
        """`self.sae(x)`, through `torch.compile` when the module was built with `compile`."""
        if self.compile_backend is None:
            return self.sae(x)
        if self._compiled is None:
            self._compiled = torch.compile(self.sae.forward, backend=self.compile_backend)
        return self._compiled(x)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_window_tokens

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x = batch_acts(batch)
        step = self.global_step
        loss, logs = self.train_step(x, step)
        if step % self.log_every == 0:
            log_scalars(self, {**logs, **learning_rates(self.trainer.optimizers[0])}, step)
        self.bar_metrics = {"loss": logs["loss/total"]}
        return loss

    def train_step(self, x: Float[Tensor, "batch d_in"], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of optimiser step `step` on the batch `x`, and its named terms (`loss/<term>`); on every
        `log_every`-th step also `metrics/l0`, `metrics/explained_variance` and `sparsity/dead_frac`.

        Everything a step does before the backward: b_dec's init (step 0), the forward, the objective and
        the dead-latent count. `step` is passed in, not read from the trainer, so that
        `saelab.multi.LitMultiSAE` runs this same step on each of its SAEs (which no trainer is attached to).
        """
        if step == 0:
            self._init_b_dec(x)
        state = TrainState(step=step, seed=self.seed, dead_mask=self.dead_mask())
        out: SAEOutput = self.forward_sae(x)
        if _distributed():
            self._average_buffers()
        loss, logs = self.objective(out, self.sae, state)
        self._count_firing(out, x.shape[0])
        if step % self.log_every == 0:
            with torch.no_grad():
                y = out.x.float()
                ev = 1 - (y - out.x_hat.float()).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
                logs["metrics/l0"] = out.l0.mean()
                logs["metrics/explained_variance"] = ev
                logs["sparsity/dead_frac"] = self.dead_mask().float().mean()
        return loss, logs

    @torch.no_grad()
    def _init_b_dec(self, x: Tensor) -> None:
        """b_dec's data-dependent init (once); under DDP on the rows of all ranks, then rank 0's b_dec."""
        if not _distributed():
            self.sae.init_b_dec(x)
            return
        # the flag is a buffer DDP keeps equal across ranks, so every rank takes the same branch
        if bool(getattr(self.sae, "b_dec_initialized", True)):
            return
        self.sae.init_b_dec(_gather_rows(x.detach()))
        # every rank solved the same problem; the broadcast makes the result bit-identical regardless
        torch.distributed.broadcast(self.sae.b_dec.data, src=0)

    @torch.no_grad()
    def _average_buffers(self) -> None:
        """Average the SAE's floating buffers over ranks (each forward updated them from its own batch).

        Computed as b_0 + Σ_r (b_r − b_0) / W, so a buffer no forward changed stays bit-identical.
        """
        bufs = [b for b in self.sae.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1) for b in bufs])
        ref = flat.clone()
        torch.distributed.broadcast(ref, src=0)
        delta = flat - ref
        torch.distributed.all_reduce(delta)
        flat = ref + delta / torch.distributed.get_world_size()
        i = 0
        for b in bufs:
            b.copy_(flat[i : i + b.numel()].view_as(b))
            i += b.numel()

    @torch.no_grad()
    def _count_firing(self, out: SAEOutput, n_tokens: int) -> None:
        """Tokens since each latent last fired, counted over the batches of all ranks."""
        counts = self._fired_counts(out)  # [d_sae] tokens of this batch each latent fired on
        self.fired_since_density += counts
        self.tokens_since_density += n_tokens
        fired = counts > 0
        if _distributed():
            dist = torch.distributed
            f = fired.to(torch.int32)
            dist.all_reduce(f, op=dist.ReduceOp.MAX)  # fired on any rank
            fired = f.bool()
            n = torch.tensor(n_tokens, dtype=torch.long, device=f.device)
            dist.all_reduce(n, op=dist.ReduceOp.SUM)  # ranks' batches may differ in size
            n_tokens = int(n)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    def _fired_counts(self, out: SAEOutput) -> Tensor:
        if out.sparse is not None:
            nz = out.sparse.vals != 0
            return torch.bincount(out.sparse.cols[nz], minlength=self.sae.d_sae)
        return (out.codes != 0).sum(0)

    def on_after_backward(self) -> None:
        self.sae.remove_parallel_decoder_grad()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # renormalise right after the update, before any callback (e.g. checkpointing) sees the weights
        self.sae.set_decoder_norm_to_unit()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx: int) -> None:
        x = batch_acts(batch)
        out: SAEOutput = self.forward_sae(x)
        self.val_l0.update(out.l0)
        self.val_ev.update(out.x, out.x_hat)
        self.val_silent.update(self._fired_counts(out), x.shape[0])

    def on_validation_epoch_end(self) -> None:
        where = f"at the validation of step {self.global_step}"
        # compute() has already reduced over ranks; sync_dist says so to Lightning, which warns otherwise
        self.log_dict(self.end_validation(self.trainer.sanity_checking, where), sync_dist=True)

    def end_validation(self, sanity_checking: bool, where: str) -> dict[str, Tensor]:
        """The validation's `val/l0` and `val/explained_variance`, with the streams reset for the next one;
        a diverged SAE is flagged (`saelab.health`, saying `where`) unless this is the sanity check of the
        untrained model."""
        ev, silent = self.val_ev.compute(), self.val_silent.compute()
        logs = {"val/l0": self.val_l0.compute(), "val/explained_variance": ev}
        for m in (self.val_l0, self.val_ev, self.val_silent):
            m.reset()
        if not sanity_checking:  # the untrained model is no sign of divergence
            health.check_divergence(self, float(ev), float(silent), where)
        return logs

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        params = [p for p in self.sae.parameters() if p.requires_grad]
        opt = self.optimizer_fn(params)
        if self.scheduler_fn is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_fn(opt), "interval": "step"}}
