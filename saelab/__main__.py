"""`python -m saelab [overrides]`: compose the config with Hydra and run its recipe."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from saelab.allocator import keep_freed_memory
from saelab.lit import end_distributed
from saelab.train import apply_debug

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def friendly_error(exc: BaseException) -> str:
    """The innermost cause of an exception, as one line a user can act on."""
    while (nxt := exc.__cause__ or exc.__context__) is not None:
        if type(exc).__name__ != "InstantiationException" and not str(exc).startswith(
            "Error in call to target"
        ):
            break
        exc = nxt
    return f"{type(exc).__name__}: {exc}"


def run_recipe(cfg: DictConfig):
    name = cfg.recipe.name
    try:
        module = importlib.import_module(f"saelab.recipes.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"saelab.recipes.{name}":
            raise
        available = sorted(p.stem for p in (ROOT / "conf" / "recipe").glob("*.yaml"))
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(available)}") from e
    return module.run(apply_debug(cfg))


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig):
    keep_freed_memory()
    try:
        results = run_recipe(cfg)
    except KeyboardInterrupt:
        print("saelab: interrupted; resume with `resume=auto hydra.run.dir=<this run dir>`.", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
        if os.environ.get("SAELAB_DEBUG"):
            raise
        print(f"saelab: error: {friendly_error(e)}\n(set SAELAB_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        end_distributed()  # under DDP every rank leaves its process group before exit
    metric = cfg.get("optimized_metric")
    if metric and isinstance(results, dict):
        value = results.get("metrics", {}).get(metric)
        return float(value) if value is not None else None
    return None


# conf/config.yaml puts ${SAELAB_ROOT} on Hydra's search path, so sweeps/ resolves from any working dir
os.environ.setdefault("SAELAB_ROOT", str(ROOT))

if __name__ == "__main__":
    main()
