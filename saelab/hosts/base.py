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
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn


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
