"""Package boundaries (DESIGN.md): the three axes never import each other, not even transitively; no
import cycles between packages; OmegaConf/Hydra stay in entry points, stages and recipes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "saelab"
# axis → the saelab packages it must never load (the data axis includes its hosts and raw-input readers)
AXES = {
    "saelab.sae": ["saelab.objectives", "saelab.data", "saelab.hosts", "saelab.io", "saelab.eval"],
    "saelab.objectives": ["saelab.sae", "saelab.data", "saelab.hosts", "saelab.io", "saelab.eval"],
    "saelab.data": ["saelab.sae", "saelab.objectives", "saelab.io", "saelab.eval", "saelab.lit"],
    "saelab.hosts": ["saelab.sae", "saelab.objectives", "saelab.io", "saelab.eval", "saelab.data"],
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module named by an import statement anywhere in the file (deferred ones too)."""
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def _unit(module: str) -> str | None:
    """The package-level unit of a saelab module: `saelab.eval.core` → `eval`, `saelab.train` → `train`."""
    parts = module.split(".")
    return parts[1] if parts[0] == "saelab" and len(parts) > 1 else None


def _loaded_after_import(module: str) -> list[str]:
    """saelab modules in sys.modules after importing every module of `module`'s package in a fresh process."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({module!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.startswith('saelab'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("axis", sorted(AXES))
def test_axes_never_load_each_other(axis: str):
    loaded = _loaded_after_import(axis)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in AXES[axis])]
    assert not bad, f"importing {axis} loads {bad}"


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        src = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for mod in imported_modules(f):
            dst = _unit(mod)
            if dst and dst != src:
                graph.setdefault(src, set()).add(dst)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, f"import cycles between packages: {cycles}"


def test_library_code_never_sees_dictconfig():
    # checks.py checks the composed config before the entry point builds anything from it
    allowed = {
        "train.py",
        "stage.py",
        "__main__.py",
        "checkpoint.py",
        "checks.py",
        "resolvers.py",
        "inspect.py",
        "sweep.py",  # Hydra callbacks of multiruns: part of the entry point
    }
    offences = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        if rel.parts[0] in ("recipes", "bench") or rel.name in allowed:
            continue
        if any(m.startswith("omegaconf") or m.startswith("hydra") for m in imported_modules(f)):
            offences.append(str(rel))
    assert not offences, f"OmegaConf/Hydra imported outside entry points and recipes: {offences}"
