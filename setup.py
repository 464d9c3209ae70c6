"""Build hook: a wheel carries the top-level `conf/` and `sweeps/` as `saelab/conf` and `saelab/sweeps`.

The repository keeps both folders at the top (DESIGN.md); `saelab.__main__` looks inside the package
first and then beside it, so an installed wheel and a checkout (`pip install -e .`) both find them.
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHIPPED = ("conf", "sweeps")
SKIP = shutil.ignore_patterns("__pycache__", ".*")


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's folders in place
            return
        for name in SHIPPED:
            shutil.copytree(
                HERE / name, Path(self.build_lib) / "saelab" / name, ignore=SKIP, dirs_exist_ok=True
            )

    def get_source_files(self) -> list[str]:
        """What an sdist takes from build_py: the package plus the shipped folders."""
        extra = [str(p.relative_to(HERE)) for name in SHIPPED for p in sorted((HERE / name).rglob("*.yaml"))]
        return [*super().get_source_files(), *extra]


setup(cmdclass={"build_py": BuildPyWithConfigs})
