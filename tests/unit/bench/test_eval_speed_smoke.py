"""bench/eval_speed.py runs end to end on the CPU and writes its rows in bench/record.py's
schema (the GPU run is the one that measures; this keeps the script working between them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_eval_speed_smoke_writes_every_row_through_the_record_schema(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'bench'}"}
    cmd = [sys.executable, str(ROOT / "bench" / "eval_speed.py"), "--device", "cpu",
           "--records", "3", "--new", "3", "--repeats", "1", "--adapters", "2",
           "--seed-prompts", "1", "--commit", "0123456", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = (tmp_path / "eval_speed").glob("*_0123456_*.json")
    data = json.loads(path.read_text())
    assert data["experiment"] == "eval_speed" and data["config"]["records"] == 3
    names = [row["name"] for row in data["rows"]]
    assert "loralab_engine_merged" in names and "k2_adapters_lora_files" in names
    k = next(row for row in data["rows"] if row["name"] == "k2_adapters_lora_files")
    assert k["base_weights_unchanged"] is True and k["new_tokens"] == 2 * 3 * 3
