"""The three axes never import each other (DESIGN.md): walk the import statements of each package."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "saelab"
AXES = {
    "sae": "saelab.sae",
    "objectives": "saelab.objectives",
    "data": "saelab.data",
    "hosts": "saelab.hosts",
}
# the data axis includes its hosts; they may use each other
SAME_AXIS = {"data": {"saelab.hosts"}, "hosts": {"saelab.data"}}


def imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def test_axes_are_independent():
    offences = []
    for axis in AXES:
        others = [m for a, m in AXES.items() if a != axis and m not in SAME_AXIS.get(axis, set())]
        for f in (PKG / axis).rglob("*.py"):
            for mod in imported_modules(f):
                if any(mod == o or mod.startswith(o + ".") for o in others):
                    offences.append(f"{f.relative_to(PKG)} imports {mod}")
    assert not offences, offences


def test_library_code_never_sees_dictconfig():
    allowed = {"train.py", "__main__.py", "checkpoint.py"}
    offences = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        if rel.parts[0] in ("recipes", "bench") or rel.name in allowed:
            continue
        if any(m.startswith("omegaconf") or m.startswith("hydra") for m in imported_modules(f)):
            offences.append(str(rel))
    assert not offences, f"OmegaConf/Hydra imported outside entry points and recipes: {offences}"
