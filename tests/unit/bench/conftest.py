"""bench/ scripts are not a package: tests load them from their files."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"


@pytest.fixture(scope="session")
def load_bench():
    """load_bench(NAME): bench/NAME.py as a module (test modules cannot import conftest)."""
    return _load


def _load(name: str) -> ModuleType:
    """bench/NAME.py as a module (named bench_NAME, so it cannot shadow another import)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
