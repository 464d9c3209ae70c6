"""File safety: atomic writes (a reader sees the old file or directory or the new one, never a half-written
one), file hashing, and files read back with one clear line when they are damaged: torch files without
running code (`load_torch`), JSON (`read_json`) and safetensors checked against a recorded sha256
(`load_safetensors`).

The temporary files and directories that atomic writes rename into place are created private (mkstemp
0600, mkdtemp 0700); `umask_mode` gives them the mode a plain open() or mkdir() would, so a colleague
on a shared filesystem can read a run's outputs when the umask lets them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


class RefusedFile(RuntimeError):
    """A torch file saelab reads back (checkpoint, host cache) that it will not load: it holds pickled
    objects other than tensors and plain values, or it is damaged. The message names the file and the fix."""


@contextlib.contextmanager
def refuse_unsafe(path: str | Path, remedy: str) -> Iterator[None]:
    """Turn the errors of a `weights_only=True` torch load of `path` into one `RefusedFile` line + `remedy`.

    A pickle that imports anything beyond tensors and plain containers (`os.system`, a class whose
    `__reduce__` runs code) is stopped by torch's restricted unpickler before it runs; saelab never writes
    such a file, so one in a run directory or cache was put there by something else.
    """
    import pickle

    try:
        yield
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL (\S+)", msg)
        if found or any(w in msg for w in ("call reduce", "new object", "is blocked")):
            what = f", here {found.group(1)}" if found else ""
            raise RefusedFile(
                f"{path} holds pickled Python objects besides tensors{what}; loading it could run code, so "
                f"saelab refuses to. {remedy}"
            ) from e
        raise RefusedFile(
            f"{path} is not a readable torch file (damaged or of another kind). {remedy}"
        ) from e
    except (EOFError, RuntimeError) as e:  # truncated or not a zip archive at all
        if isinstance(e, RefusedFile):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefusedFile(f"{path} is not a readable torch file ({first}). {remedy}") from e


class CorruptFile(ValueError):
    """A file saelab reads back (an export's cfg.json or weights) that is unreadable, fails its checksum or
    contradicts itself; the message names the file, the field and the fix."""


def check_sha256(path: str | Path, expected: str, remedy: str) -> None:
    """Raise `CorruptFile` (naming `path` and `remedy`) unless the file's sha256 is `expected`."""
    got = sha256_file(path)
    if got != expected:
        raise CorruptFile(
            f"{path} fails its checksum (sha256 {got[:12]}…, recorded {str(expected)[:12]}…): it changed after "
            f"it was written. {remedy}"
        )


def read_json(path: str | Path, remedy: str) -> Any:
    """The JSON value in `path`; damaged JSON raises `CorruptFile` naming the file, the place and `remedy`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFile(f"{path} is not valid JSON ({e}). {remedy}") from e


# safetensors header metadata saelab writes: a checksum recorded beside the file (an export's cfg.json)
# applies only to a file that carries it. SAELens's `save_model` copies cfg.json's metadata, checksum
# included, but writes a header without it, so an export it rewrites (e.g. after fine-tuning) still loads.
WRITER_TAG = {"written_by": "saelab"}


def save_safetensors(tensors: dict[str, Any], path: str | Path) -> str:
    """Write `tensors` to `path` with saelab's header tag (`WRITER_TAG`) and return the file's sha256."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=WRITER_TAG)
    return sha256_file(path)


def load_safetensors(path: str | Path, remedy: str, sha256: str | None = None) -> dict[str, Any]:
    """The tensors of a safetensors file on the CPU; a damaged file raises `CorruptFile` naming it and `remedy`
    (safetensors' own error names no file). A `sha256` recorded when saelab wrote the file is checked first;
    it is ignored when the header lacks saelab's tag (another tool rewrote the file, see `WRITER_TAG`)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if sha256 is not None:
            with safe_open(str(path), "pt") as f:
                ours = (f.metadata() or {}).items() >= WRITER_TAG.items()
            if ours:
                check_sha256(path, sha256, remedy)
        return load_file(str(path))
    except SafetensorError as e:
        raise CorruptFile(f"{path} is not a readable safetensors file ({e}). {remedy}") from e


def load_torch(path: str | Path, remedy: str) -> Any:
    """`torch.load(path)` on the CPU with `weights_only=True` (tensors and plain values only, whatever
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says); a refused or damaged file raises `RefusedFile` naming it and
    `remedy` (what the user should do, e.g. "Delete it; saelab then trains sasrec again.")."""
    import torch

    with refuse_unsafe(path, remedy):
        return torch.load(path, map_location="cpu", weights_only=True)
