"""bench/eval_speed.py runs end to end on the CPU and writes its rows in bench/record.py's
schema (the GPU run is the one that measures; this keeps the script working between them)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_eval_speed_smoke_writes_every_row_through_the_record_schema(tmp_path, run_bench):
    path = run_bench("eval_speed", "--device", "cpu", "--records", "3", "--new", "3",
                     "--repeats", "1", "--adapters", "2", "--seed-prompts", "1",
                     "--commit", "0123456", out=tmp_path, timeout=600)
    assert path.match("*_0123456_*.json")
    data = json.loads(path.read_text())
    assert data["experiment"] == "eval_speed" and data["config"]["records"] == 3
    names = [row["name"] for row in data["rows"]]
    assert "loralab_engine_merged" in names and "k2_adapters_lora_files" in names
    k = next(row for row in data["rows"] if row["name"] == "k2_adapters_lora_files")
    assert k["base_weights_unchanged"] is True and k["new_tokens"] == 2 * 3 * 3
