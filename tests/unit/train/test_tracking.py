"""Trackers: SwanLab local, TensorBoard, and a tracker that cannot start never stops training."""

from __future__ import annotations

import pytest

from loralab.config import TrackingConfig
from loralab.train.tracking import Tracker, start_tracker


def test_none_backend_is_a_no_op(tmp_path):
    tracker = start_tracker(TrackingConfig(backend="none"), tmp_path / "run", {})
    assert type(tracker) is Tracker
    tracker.log({"train/loss": 1.0}, 1)
    tracker.finish()


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = start_tracker(TrackingConfig(backend="tensorboard"), tmp_path / "run", {})
    tracker.log({"train/loss": 1.5}, 1)
    tracker.finish()
    assert list((tmp_path / "tensorboard" / "run").glob("events.out.tfevents.*"))


def test_online_swanlab_without_network_falls_back_once(tmp_path, monkeypatch, capsys):
    pytest.importorskip("swanlab")
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_SAVE_DIR", str(tmp_path / "home"))
    tracker = start_tracker(TrackingConfig(backend="swanlab", mode="online"), tmp_path / "run", {})
    assert type(tracker) is Tracker
    assert "could not start" in capsys.readouterr().err


def test_swanlab_local_logs_to_the_folder_beside_the_run(tmp_path):
    pytest.importorskip("swanboard")
    tracker = start_tracker(TrackingConfig(backend="swanlab", project="t"), tmp_path / "run", {"a": 1})
    assert tracker.name == "swanlab"
    tracker.log({"train/loss": 2.0}, 1)
    tracker.finish()
    assert any((tmp_path / "swanlog").iterdir())
