"""Shared machinery of host adapters (frozen foundation models with a hook point).

Every host exposes the same small surface:
  * `d_in`: width at the hook point; `hook`: the resolved module path;
  * `activations(**inputs) -> [batch, seq, d_in]`: the hook module's output, with the forward stopped
    right after that module (nothing past the hook layer is computed);
  * `spliced(fn)`: a context manager under which the full forward replaces the hook output h by fn(h)
    (fn = SAE reconstruction for CE/KL, or a steering intervention).

Hook points are HF module paths ("model.layers.6") or a layer index (6 → the i-th block of the
model's main layer list). A wrong name fails with the list of valid ones.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlsplit

import torch
from torch import Tensor, nn

HUB_PROBE_SECONDS = 3.0  # how long the HF hub may take to accept a connection before it counts as unreachable


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the activations of interest are captured."""


def right_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id rows right-padded to the longest with `pad_id`, and their attention mask (1 on real tokens)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        att[j, : len(s)] = 1
    return ids, att


def hub_access(source: str) -> tuple[dict, str | None]:
    """(extra `from_pretrained` kwargs, why the HF hub cannot be used) for a model id or local folder.

    Offline (`HF_HUB_OFFLINE`), or when the hub's host (or the https proxy) does not accept a connection
    within `HUB_PROBE_SECONDS`, a model id is read from the local HF cache only (`local_files_only`): a
    machine without network then fails in seconds instead of after huggingface_hub's retries (about a
    minute), and `why` says what the error message should. A local folder needs no hub.
    """
    if os.path.isdir(source):
        return {}, None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return {"local_files_only": True}, "HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 80
    if _reachable(host, port):
        return {}, None
    return {"local_files_only": True}, f"{host} cannot be reached (no network?)"


@functools.lru_cache(maxsize=8)
def _reachable(host: str, port: int) -> bool:
    """Whether `host:port` accepts a TCP connection within `HUB_PROBE_SECONDS` (asked once per process)."""
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def hub_error(source: str, key: str, why: str | None, err: BaseException, offline_default: str) -> str:
    """One line for a model that `from_pretrained` could not load: the config key, why, and what to do."""
    if why:
        return (
            f"cannot load {source!r} ({key}): {why} and it is not in the local HF cache; download it where "
            f"the hub is reachable, or use the offline default {offline_default}."
        )
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return f"cannot load {source!r} ({key}): {first}; check the id, or use the offline default {offline_default}."


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of blocks in `model` (e.g. model.layers, gpt_neox.layers, esm.encoder.layer)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of layers; name the hook by module path.")
    return best


def resolve_hook(model: nn.Module, hook: str | int) -> tuple[str, nn.Module]:
    """(module path, module) for a hook given as a path or a layer index."""
    modules = dict(model.named_modules())
    if isinstance(hook, int) or (isinstance(hook, str) and hook.lstrip("-").isdigit()):
        prefix, layers = layer_list(model)
        i = int(hook)
        if not -len(layers) <= i < len(layers):
            raise ValueError(
                f"hook layer {i} is out of range: {prefix} has {len(layers)} layers (0..{len(layers) - 1})."
            )
        i %= len(layers)
        return f"{prefix}.{i}", layers[i]
    if hook not in modules:
        prefix, layers = layer_list(model)
        valid = [f"{prefix}.{i}" for i in range(len(layers))]
        raise ValueError(
            f"unknown hook point {hook!r}. Valid block outputs: {', '.join(valid)} "
            f"(or any module path of {type(model).__name__}, or a layer index 0..{len(layers) - 1})."
        )
    return hook, modules[hook]


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, h: Tensor):
    if isinstance(output, tuple):
        return (h, *output[1:])
    return h


@contextlib.contextmanager
def capture_and_stop(module: nn.Module, store: list) -> Iterator[None]:
    """While active, a forward appends the module's output hidden state to `store` and stops."""

    def hook(_mod, _inp, output):
        store.append(_hidden(output))
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def replace_output(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, the module's output hidden state h is replaced by fn(h) (same shape and dtype)."""

    def hook(_mod, _inp, output):
        h = _hidden(output)
        new = fn(h)
        if new.shape != h.shape:
            raise ValueError(
                f"spliced function changed the hidden shape {tuple(h.shape)} → {tuple(new.shape)}."
            )
        return _with_hidden(output, new.to(h.dtype))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, module: nn.Module, **inputs) -> Tensor:
    """Forward `model` on `inputs` and return `module`'s output hidden state, computing nothing after it."""
    store: list[Tensor] = []
    with torch.no_grad(), capture_and_stop(module, store):
        try:
            model(**inputs)
        except StopForward:
            pass
    if not store:
        raise RuntimeError("the hook module was not reached in the forward pass.")
    return store[0]
