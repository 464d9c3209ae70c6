"""Checkpoint plumbing: atomic checkpoint files, the resolved config stored inside each one, which
checkpoint a run continues from (and whether it belongs to this run), and a checkpoint on Ctrl-C."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from saelab.files import refuse_unsafe, umask_mode

# what to do about a checkpoint that is refused (pickled code) or damaged
REFUSED_REMEDY = "Delete it (resume=auto then starts afresh) or point resume= at another checkpoint."


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the target directory, then renames: a killed run never leaves a
    truncated `.ckpt` behind (the previous checkpoint stays valid until the new one is complete).

    Loads (`resume=auto`, `resume=<path>`) read tensors and plain values only: a checkpoint whose pickle
    would run code is refused with one line naming it, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says."""

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        kw = {} if map_location is None else {"map_location": map_location}  # else the parent's default
        with refuse_unsafe(path, REFUSED_REMEDY):
            return super().load_checkpoint(path, weights_only=True, **kw)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.fchmod(fd, umask_mode())  # mkstemp's 0600 would make the checkpoint private
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


class ConfigInCheckpoint(pl.Callback):
    """Stores the run's resolved config (a plain dict) in every checkpoint under `saelab_config`."""

    def __init__(self, resolved_config: dict) -> None:
        self.resolved_config = resolved_config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["saelab_config"] = self.resolved_config


# What a fit writes into <run>/checkpoints/<stage>/: last.ckpt and one step checkpoint (ModelCheckpoint's
# default name, save_top_k=1). saelab's atomic writes (here and in saelab/files.py) go through temporary
# files and directories named `.<name>.tmp-<8 characters>` (mkstemp, mkdtemp), renamed when complete.
LAST = "last.ckpt"
STEP_CHECKPOINT = re.compile(r"epoch=\d+-step=\d+\.ckpt")
TEMPORARY = re.compile(r"\..+\.tmp-[a-z0-9_]{8}")

# What may differ between a run and the run it resumes. How long it trains: the step budget (a schedule
# that reads it, `total_steps: ${trainer.max_steps}`, stretches with it, as does the dead-latent window,
# a tenth of the run by default). And what records or reports a run
# without changing what it computes: where it is written and logged, how often it logs and checkpoints,
# what its dashboards show, what a degenerate run does (warn or stop), and presets (`debug`) whose effect
# is in the keys they set.
RESUMABLE = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "lit.dead_window_tokens",
    "resume",
    "run_dir",
    "name",
    "paths",
    "hydra",
    "logger",
    "checkpoint",
    "dashboards",
    "debug",
    "recipe.debug",
    "optimized_metric",
    "lit.log_every",
    "lit.on_degenerate",
    "lit.compile",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)

_ABSENT: Any = object()


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (Lightning reads the rank from the launcher's environment)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents with its tensors memory-mapped (its step and config cost no copy of the
    weights); tensors and plain values only, like every checkpoint load (`refuse_unsafe`)."""
    with refuse_unsafe(path, REFUSED_REMEDY):
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict):
        raise TypeError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint. {REFUSED_REMEDY}")
    return ckpt


def checkpoints_in(ckpt_dir: Path, last: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    """The step checkpoints of a stage's checkpoint directory, and last.ckpt unless `last` is False, each
    with its contents."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in sorted(ckpt_dir.iterdir()):
        if (last and p.name == LAST) or STEP_CHECKPOINT.fullmatch(p.name):
            with contextlib.suppress(FileNotFoundError):  # under DDP rank 0 may remove a superseded one
                found.append((p, read_checkpoint(p)))
    return found


def newest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint of `ckpt_dir` at the highest step (last.ckpt on a tie) and its contents, or None.

    Usually last.ckpt. ModelCheckpoint writes the step checkpoint first and last.ckpt second, so a kill
    during the last.ckpt write leaves a complete step checkpoint newer than last.ckpt, or the only one.
    """
    found = checkpoints_in(ckpt_dir)
    if not found:
        return None
    return max(found, key=lambda pc: (int(pc[1].get("global_step", -1)), pc[0].name == LAST))


def remove_temporaries(*folders: Path) -> list[Path]:
    """Remove the temporary files and directories a killed atomic write left directly in `folders`, and
    return them. Call only while nothing of this run is being written there (at a fit's start)."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not TEMPORARY.fullmatch(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_superseded(ckpt_dir: Path, cfg: DictConfig) -> list[Path]:
    """Remove the step checkpoints of this run (`cfg`: no `config_differences`) older than the newest
    step checkpoint, and return them.

    A fit keeps one step checkpoint, deleting the previous one after writing the next; a kill between the
    two leaves both. A fit resumed from a step checkpoint keeps that one too (Lightning never deletes the
    checkpoint it resumed from). Step checkpoints of other runs are left alone.
    """
    steps = checkpoints_in(ckpt_dir, last=False)
    if len(steps) < 2:
        return []
    newest = max(int(ckpt.get("global_step", -1)) for _, ckpt in steps)
    removed = []
    for path, ckpt in steps:
        stored = ckpt.get("saelab_config")
        if int(ckpt.get("global_step", -1)) >= newest or not isinstance(stored, dict):
            continue
        if not config_differences(stored, cfg):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def config_differences(stored: Mapping[str, Any], cfg: DictConfig) -> list[str]:
    """`key: old → new` for each key in which `cfg` differs from the run that wrote a checkpoint (`stored`,
    its resolved `saelab_config`), leaving out the `RESUMABLE` keys and the values interpolated from them.

    A difference that follows from another (`sae.seed: ${seed}` when `seed` changed) is named through that
    one only: a key stays in the list if it still differs with every other difference undone.
    """
    old = _flat(stored)
    # the RESUMABLE keys as the checkpoint's run had them, so what interpolates them compares equal
    base = {k: v for k in RESUMABLE if (v := _get(stored, k)) is not _ABSENT}
    new = _resolved(cfg, base)
    keys = (k for k in old.keys() | new.keys() if not _is_resumable(k))
    differ = sorted(k for k in keys if old.get(k, _ABSENT) != new.get(k, _ABSENT))

    def own(key: str) -> bool:
        undone = base | {j: old.get(j, _ABSENT) for j in differ if j != key}
        try:
            again = _resolved(cfg, undone)
        except Exception:  # noqa: BLE001 - undoing made the config unresolvable: count the key as its own
            return True
        return again.get(key, _ABSENT) != old.get(key, _ABSENT)

    if 1 < len(differ) <= 16:  # a few resolutions each; a long list is shown as it is
        differ = [k for k in differ if own(k)] or differ
    return [f"{k}: {_show(old.get(k, _ABSENT))} → {_show(new.get(k, _ABSENT))}" for k in differ]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} for the leaves of nested mappings (a list is one value)."""
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: tree} if prefix else {}


def _get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _is_resumable(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUMABLE)


def _resolved(cfg: DictConfig, values: Mapping[str, Any]) -> dict[str, Any]:
    """`cfg` with `values` set ({dotted key: value, or _ABSENT to remove the key}), resolved and flattened."""
    c = copy.deepcopy(cfg)
    with read_write(c), open_dict(c):
        for key, value in values.items():
            if value is not _ABSENT:
                OmegaConf.update(c, key, value, merge=False)
                continue
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(c, parent) if parent else c
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
    return _flat(OmegaConf.to_container(c, resolve=True))


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(value, default=str)  # null, true, [0.9, 0.999]
    return text if len(text) <= 40 else text[:39] + "…"


class CheckpointOnInterrupt(pl.Callback):
    """Ctrl-C during training: finish the step under way, save `path` (the stage's last.ckpt) and stop with
    KeyboardInterrupt; a second Ctrl-C stops at once, saving nothing more.

    The checkpoint is written between steps, where the periodic ones are, so a run resumed from it ends
    with the weights of one never stopped. Under DDP every rank receives the Ctrl-C, maybe a step apart;
    they agree on stopping every `SYNC_EVERY` steps (one all-reduce of a flag), so all save the same step.
    Use `guard` around `trainer.fit`: Lightning answers a KeyboardInterrupt with `sys.exit(1)`.
    """

    SYNC_EVERY = 10

    def __init__(self, path: Path, shown: str) -> None:
        self.path, self.shown = path, shown
        self.requested = False
        self.saved_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            signal.signal(signal.SIGINT, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if is_rank_zero():  # os.write: a print here could re-enter a print under way
            os.write(2, b"\nsaelab: stopping after this step to save a checkpoint (Ctrl-C again: stop now)\n")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.world_size == 1 or trainer.global_step % self.SYNC_EVERY == 0:
            self._stop_if_requested(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_requested(trainer)

    def _stop_if_requested(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            trainer.save_checkpoint(self.path)
            self.saved_step = trainer.global_step
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def guard(self, trainer: pl.Trainer) -> Iterator[None]:
        """Around `trainer.fit`: a KeyboardInterrupt leaves it as one (Lightning turns it into
        `sys.exit(1)`), its message naming the checkpoint saved; the SIGINT handler is put back."""
        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGINT) if main else None
        try:
            yield
        except SystemExit:
            if not trainer.interrupted:
                raise
            raise KeyboardInterrupt(self._saved()) from None
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
        if self.requested:  # Ctrl-C after the last step: training is done, the run still stops
            raise KeyboardInterrupt(self._saved())

    def _saved(self) -> str:
        return "" if self.saved_step is None else f"{self.shown} saved at step {self.saved_step}"
