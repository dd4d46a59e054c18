"""Shared fixtures: the builtin Qwen2.5 tokenizer, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A freshly built builtin tokenizer folder (not the user's cache)."""
    from loralab.model.tokenizer import builtin_tokenizer_dir

    return builtin_tokenizer_dir(tmp_path_factory.mktemp("tokenizers") / "qwen2.5")


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    """The builtin Qwen2.5 tokenizer (real vocabulary, Qwen2.5 chat template)."""
    from loralab.model.tokenizer import load_tokenizer

    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def run_bench():
    """run_bench(NAME, *args, out=DIR, timeout=300): bench/NAME.py in a subprocess on the CPU
    (src and bench on its path, no CUDA device visible), checked to exit 0; the one result
    file it wrote under DIR/NAME (test modules cannot import conftest: hence a fixture)."""
    return _run_bench


def _run_bench(name: str, *args: str, out: Path, timeout: int = 300) -> Path:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'bench'}",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(root / "bench" / f"{name}.py"), *args,
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    files = list((out / name).glob("*.json"))
    assert len(files) == 1, files
    return files[0]
