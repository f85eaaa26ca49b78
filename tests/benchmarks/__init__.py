"""Tests of the scripts in benchmarks/."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from ..conftest import REPO


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
