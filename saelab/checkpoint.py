"""Checkpoint plumbing: atomic checkpoint files and the resolved config stored inside each one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from saelab.files import umask_mode


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the target directory, then renames: a killed run never leaves a
    truncated `.ckpt` behind (the previous checkpoint stays valid until the new one is complete)."""

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
