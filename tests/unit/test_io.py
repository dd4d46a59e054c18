"""Atomic writes: a failed write leaves the previous file whole and no stray temp files."""

from __future__ import annotations

import pytest

from loralab.io import append_jsonl, atomic_write_text, read_json, read_jsonl, write_json


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(path, {"status": "done"})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "{half")
    assert read_json(path) == {"status": "done"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_jsonl_skips_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1}]
