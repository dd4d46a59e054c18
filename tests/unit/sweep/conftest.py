"""Sweep fixtures: a small base train config and a helper that writes sweep files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture
def base_config(tmp_path: Path) -> Path:
    """A train config next to a (tiny) records file; validation needs no model or tokenizer."""
    (tmp_path / "records.json").write_text('[{"instruction": "i", "input": "x", "output": "y"}]')
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": "runs/ignored",
        "model": {"path": "builtin:tiny-qwen2"},
        "data": {"path": "records.json"},
        "tracking": {"backend": "none"},
    }))
    return path


@pytest.fixture
def write_sweep(tmp_path: Path, base_config: Path):
    """write_sweep(dict) → path of a sweep file in tmp_path with base: train.yaml by default."""
    def write(body: dict, name: str = "sweep.yaml") -> Path:
        body = {"base": base_config.name, "output_dir": str(tmp_path / "out"), **body}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    return write
