"""bench/record.py: one schema for every benchmark result, one folder per experiment."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{4}_[0-9a-z]+(-dirty)?_[0-9a-z]+(_\w+)?\.(json|jsonl|md)$")


@pytest.fixture(scope="module")
def record(load_bench):
    return load_bench("record")


def test_a_run_is_written_with_the_schema_into_its_experiment_folder(record, tmp_path):
    rows = [{"system": "a", "tokens_per_s": 1.0}]
    path = record.write_run(tmp_path, "train_speed", config={"steps": 3}, rows=rows,
                            summary={"same_math": None}, commit="0123456789abcdef")
    assert path.parent == tmp_path / "train_speed" and NAME.match(path.name), path.name
    assert "_0123456_" in path.name
    data = record.read_run(path)
    assert list(data) == [*record.KEYS, "summary"]
    assert data["experiment"] == "train_speed" and data["rows"] == rows
    # Written again after another row: the same file (a timeout keeps what was measured).
    again = record.write_run(tmp_path, "train_speed", config={"steps": 3}, rows=rows * 2,
                             commit="0123456789abcdef")
    assert again == path and len(record.read_run(path)["rows"]) == 2


def test_a_file_off_the_schema_is_refused(record, tmp_path):
    path = record.write_run(tmp_path, "x", config={}, rows=[], commit="abc")
    data = json.loads(path.read_text())
    for broken in ({**data, "environment": {}}, {k: v for k, v in data.items() if k != "rows"},
                   {**data, "rows": {"a": 1}}):
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError):
            record.read_run(path)


def test_results_are_one_folder_per_experiment_with_dated_names(record):
    files = [p for p in (BENCH / "results").rglob("*") if p.is_file() and p.name != "README.md"]
    assert files
    for path in files:
        assert path.parent.parent == BENCH / "results", path  # results/<experiment>/<file>
        assert NAME.match(path.name), path
        if path.suffix == ".json" and "experiment" in json.loads(path.read_text()) and \
                "rows" in json.loads(path.read_text()):
            assert record.read_run(path)["experiment"] == path.parent.name
