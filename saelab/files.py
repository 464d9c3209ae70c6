"""File safety: atomic writes (a reader sees the old file or directory or the new one, never a half-written
one) and file hashing.

The temporary files and directories that atomic writes rename into place are created private (mkstemp
0600, mkdtemp 0700); `umask_mode` gives them the mode a plain open() or mkdir() would, so a colleague
on a shared filesystem can read a run's outputs when the umask lets them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or directory (0o777) gets under the process umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask: read from /proc on Linux; elsewhere by setting it (to a strict one for an instant,
    so a file another thread creates meanwhile comes out private, never more open) and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target`, on error it is removed.

    Everything in it gets the umask's modes before the rename: besides mkdtemp, some writers create
    private files themselves (safetensors' `save_file` writes 0600)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
        for folder, _, files in os.walk(tmp):
            os.chmod(folder, dir_mode)
            for name in files:
                os.chmod(os.path.join(folder, name), file_mode)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o):
    try:
        import numpy as np
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, (np.generic, np.ndarray)):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (constant memory for any size)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
