"""Checks of a composed config before anything is built.

A bad value stops the run with one line that names its key and says what to set, instead of a Python error
from deep inside a constructor, or a run that trains on a value it silently changed:

* sizes that must be positive whole numbers are (`data.batch_size`, `sae.d_sae`, ...; `sae.d_sae=12.5` is
  refused, not truncated to 12), the learning rate is a positive number and every loss coefficient a
  non-negative one;
* the objective has terms, a residual SAE has its base, and `data.d_in` agrees with the host's width;
* every `_target_` node binds to its callable: no key the callable does not take, and every value of a
  parameter annotated int, float, bool or a Literal has that type (`objective.terms.tilted.t=abc`).

`check_config(cfg)` runs where every run starts (`saelab.__main__.run_recipe`) and again on each stage's
config in `saelab.stage.train_stage`, which also covers recipes called from Python.
"""

from __future__ import annotations

import inspect
import math
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to set it to."""


_ABSENT = object()

# whole numbers with a lower bound, and an example value for the message
_AT_LEAST: dict[str, tuple[int, int | None]] = {
    "data.batch_size": (1, 512),
    "data.d_in": (1, None),  # no example: it is the width of the source
    "data.train_tokens": (1, 150000),
    "data.val_tokens": (1, 8192),
    "data.context_len": (2, 128),
    "data.harvest_batch": (1, 16),
    "sae.d_sae": (1, 512),
    "sae.activation.k": (1, 8),
    "sae.residual.d_sae": (1, 128),
    "sae.residual.activation.k": (1, 4),
    "lit.log_every": (1, 10),
    "lit.dead_window_tokens": (1, 1000000),
    "checkpoint.every_n_steps": (1, 200),
    "dashboards.density_every": (0, 200),  # 0: no density histograms
    "dashboards.density_bins": (1, 50),
}
# whole numbers of any sign (their range is checked where they are used)
_WHOLE: dict[str, int] = {"trainer.max_steps": 2000, "seed": 0}
# real numbers > 0
_POSITIVE: dict[str, float] = {"optim.optimizer.lr": 0.003}


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first value of `cfg` that cannot work (see the module docstring)."""
    _check_objective(cfg)
    for key, (low, example) in _AT_LEAST.items():
        _check_whole(cfg, key, low, example)
    for key, example in _WHOLE.items():
        _check_whole(cfg, key, None, example)
    for key, pos in _POSITIVE.items():
        value = _get(cfg, key)
        if value is not _ABSENT and not (_is_number(value) and math.isfinite(value) and value > 0):
            raise _bad(key, value, "a positive number", pos)
    _check_residual(cfg)
    _check_width(cfg)
    for path, node in _targets(cfg):
        _check_target(path, node)


def _get(node: DictConfig, key: str) -> Any:
    """The resolved value at a dotted key, or `_ABSENT` where it is absent or does not resolve (an
    interpolation that fails is reported by whatever reads it)."""
    try:
        return OmegaConf.select(node, key, default=_ABSENT, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{key} is not set (???): give it a value, e.g. {key}=<value>.") from e
    except OmegaConfBaseException:
        return _ABSENT


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(key: str, value: Any, expected: str, example: Any = None) -> ConfigError:
    """`<key>=<value> is not <expected>: set <key> to <expected>, e.g. <key>=<example>.`"""
    said = f"{key} is empty" if value == "" else f"{key}={value!r} is not {expected}"
    tail = f", e.g. {key}={example}" if example is not None else ""
    to = "one of these" if expected.startswith("one of") and value != "" else expected  # said once
    return ConfigError(f"{said}: set {key} to {to}{tail}.")


def _check_whole(cfg: DictConfig, key: str, low: int | None, example: int | None) -> None:
    value = _get(cfg, key)
    if value is _ABSENT or (value is None and key == "data.d_in"):  # a missing d_in has its own message
        return
    if low is None:
        if type(value) is not int:
            raise _bad(key, value, "an integer", example)
    elif type(value) is not int or value < low:
        raise _bad(key, value, "a positive integer" if low == 1 else f"an integer of at least {low}", example)


def _check_objective(cfg: DictConfig) -> None:
    terms = _get(cfg, "objective.terms")
    if terms is _ABSENT or not terms:
        raise ConfigError("the objective has no terms: choose some, e.g. objective/terms=[mse,auxk].")
    if not isinstance(terms, DictConfig):
        raise ConfigError(
            f"objective.terms={terms!r} is not a set of terms: choose them as objective/terms=[mse,auxk]."
        )
    for name in map(str, terms):  # config keys are strings here
        key = f"objective.terms.{name}.coeff"
        value = _get(cfg, key)
        if value is not _ABSENT and not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise _bad(key, value, "a non-negative number", 1.0)


def _check_residual(cfg: DictConfig) -> None:
    """`sae=residual` needs the export of the frozen base SAE (`sae.base.path`)."""
    sae = cfg.get("sae")
    if not isinstance(sae, DictConfig) or not str(sae.get("_target_", "")).endswith("ResidualSAE"):
        return
    base = _get(cfg, "sae.base")
    fix = "set sae.base.path=<export dir of the base SAE> (a trained run's <run dir>/sae)"
    if isinstance(base, DictConfig) and str(base.get("_target_", "")).endswith("load_sae"):
        path = _get(cfg, "sae.base.path")
        if path is _ABSENT or path in (None, ""):
            raise ConfigError(f"sae=residual has no base SAE: {fix}.")
        if not Path(str(path)).is_dir():
            raise ConfigError(f"sae.base.path={path} is not a directory: {fix}.")
    elif not isinstance(base, DictConfig):
        shown = "is not set" if base in (_ABSENT, None) else f"={base!r} is not a loader node"
        raise ConfigError(f"sae=residual: sae.base {shown}; {fix}.")


def _check_width(cfg: DictConfig) -> None:
    """`data.d_in` (what the SAE is built for) against the host's declared width `data.host.d_in`."""
    if not isinstance(cfg.get("data"), DictConfig) or not isinstance(cfg.data.get("host"), DictConfig):
        return
    d_in, width = _get(cfg, "data.d_in"), _get(cfg, "data.host.d_in")
    if type(d_in) is int and type(width) is int and d_in != width:
        raise ConfigError(
            f"data.d_in={d_in} but the host's activations have width data.host.d_in={width}: set "
            f"data.d_in={width}, or drop the data.d_in override (it follows data.host.d_in)."
        )


# ------------------------------------------------------------------------ every `_target_` node


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """(dotted path, node) of every `_target_` node under `node`, without resolving interpolations."""
    if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing()):
        return
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key, child in node.items_ex(resolve=False):
            name = str(key)
            if path or name != "hydra":
                yield from _targets(child, f"{path}.{name}" if path else name)
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False)):
            yield from _targets(child, f"{path}[{i}]")


def _check_target(path: str, node: DictConfig) -> None:
    """Every key of a `_target_` node is a parameter of its callable, of the annotated scalar type."""
    target = str(node._target_)
    try:
        fn = get_object(target)
        params = inspect.signature(fn).parameters
    except Exception:  # noqa: BLE001 - an unknown target is reported by instantiate, with its import error
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hints = _hints(fn)
    for key in node.keys():
        name = str(key)
        if name.startswith("_"):  # _target_, _partial_, _convert_, _recursive_, _args_
            continue
        where = f"{path}.{name}" if path else name
        p = params.get(name)
        if p is None or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if takes_any:
                continue
            names = [n for n, q in params.items() if q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
            takes = f" (it takes {', '.join(names)})" if len(names) <= 12 else ""
            raise ConfigError(f"{where} is not a parameter of {target}{takes}: remove it.")
        if name not in hints:
            continue
        value = _get(node, name)
        if value is _ABSENT or isinstance(value, (DictConfig, ListConfig)):
            continue
        if _accepts(hints[name], value) is False:
            default = p.default if p.default is not p.empty and _accepts(hints[name], p.default) else None
            raise _bad(where, value, _describe(hints[name]), default)


def _hints(fn: Any) -> dict[str, Any]:
    """The evaluated annotations of a callable's parameters (of `__init__` for a class), each one on its own,
    so one annotation that does not evaluate costs only its own check."""
    init = inspect.unwrap(fn.__init__ if inspect.isclass(fn) else fn)
    scope = getattr(init, "__globals__", None) or vars(sys.modules.get(getattr(fn, "__module__", ""), sys))
    out = {}
    for name, ann in getattr(init, "__annotations__", {}).items():
        if isinstance(ann, str):
            try:
                ann = eval(ann, scope)  # what typing.get_type_hints does with a postponed annotation
            except Exception:  # noqa: BLE001
                continue
        out[name] = ann
    return out


def _accepts(tp: Any, value: Any) -> bool | None:
    """Whether a config value fits the annotation `tp`: True, False, or None where a config value cannot be
    judged against it (a class, a container, a string annotation: left to the callable)."""
    if value is None:  # `x: int = None` is common; None reaches the callable as it did before
        return None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(a, value) for a in typing.get_args(tp) if a is not type(None)]
        if True in verdicts:
            return True
        return None if None in verdicts else False
    if tp is bool:
        return isinstance(value, bool) or (type(value) is int and value in (0, 1))
    if tp is int:
        return type(value) is int
    if tp is float:
        return _is_number(value)
    torch = sys.modules.get("torch")
    if torch is not None and tp is torch.Tensor:  # a config scalar is never a tensor (`lr: float | Tensor`)
        return False
    return None


def _describe(tp: Any) -> str:
    """The annotation in words: "an integer", "a number", "true or false", "one of 'a', 'b'"."""
    parts = _flat(tp)
    choices = [repr(a) for p in parts if typing.get_origin(p) is Literal for a in typing.get_args(p)]
    words = [{bool: "true or false", int: "an integer", float: "a number"}.get(p, "") for p in parts]
    if choices:
        words.append("one of " + ", ".join(choices))
    return " or ".join(dict.fromkeys(w for w in words if w))


def _flat(tp: Any) -> list[Any]:
    """The members of a (nested) union other than None; [tp] for anything else."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) if a is not type(None) for m in _flat(a)]
    return [tp]
