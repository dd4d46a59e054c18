"""The runner's bookkeeping with a stand-in for training (no model): failures, Ctrl-C, resume."""

from __future__ import annotations

import pytest

import loralab.sweep.runner as runner
import loralab.train.loop as loop
from loralab.layout import SweepDir
from loralab.sweep.spec import load_sweep


@pytest.fixture
def fake_training(monkeypatch):
    calls = {"loads": 0, "trained": [], "fail": {}, "interrupt": set()}

    def fake_load(trial):
        calls["loads"] += 1
        return object()

    def fake_train_run(cfg, *, base, overwrite, show_progress, resume=False):
        name = cfg.tracking.experiment
        calls["trained"].append(name)
        if name in calls["interrupt"]:
            raise KeyboardInterrupt
        if name in calls["fail"]:
            raise calls["fail"][name]
        return {"final_loss": 1.0 / cfg.lora.r, "steps": 2, "tokens_per_s": 10.0,
                "wall_seconds": 1.0, "train_seconds": 0.5}

    monkeypatch.setattr(runner, "load_base", fake_load)
    monkeypatch.setattr(loop, "train_run", fake_train_run)
    return calls


@pytest.fixture
def spec(write_sweep):
    return load_sweep(write_sweep({"grid": {"lora.r": [4, 8, 16]}}))


def test_failed_trials_are_recorded_and_the_sweep_goes_on(spec, fake_training):
    fake_training["fail"]["r8"] = FloatingPointError("loss is nan at step 1: try a lower train.lr")
    manifest = runner.run_sweep(spec, show_progress=False)
    assert [t["status"] for t in manifest["trials"]] == ["done", "failed", "done"]
    assert manifest["trials"][1]["error"].startswith("FloatingPointError: loss is nan")
    assert manifest["trials"][2]["result"]["final_loss"] == 1 / 16
    assert fake_training["loads"] == 1  # one base for every trial
    assert SweepDir(spec.output_dir).read_manifest() == manifest


def test_ctrl_c_leaves_a_consistent_manifest_and_resume_finishes(spec, fake_training):
    fake_training["interrupt"].add("r8")
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(spec, show_progress=False)
    saved = SweepDir(spec.output_dir).read_manifest()
    assert [t["status"] for t in saved["trials"]] == ["done", "interrupted", "pending"]
    fake_training["interrupt"].clear()
    fake_training["trained"].clear()
    manifest = runner.run_sweep(spec, resume=True, show_progress=False)
    assert fake_training["trained"] == ["r8", "r16"]  # r4 was done: skipped
    assert [t["status"] for t in manifest["trials"]] == ["done"] * 3


def test_trials_with_different_bases_load_each_base_once(write_sweep, fake_training):
    spec = load_sweep(write_sweep({"grid": {"train.precision": ["fp32", "bf16"], "lora.r": [4, 8]}}))
    manifest = runner.run_sweep(spec, show_progress=False)
    assert fake_training["loads"] == 2
    assert fake_training["trained"] == ["precision-fp32_r4", "precision-fp32_r8",
                                        "precision-bf16_r4", "precision-bf16_r8"]
    assert all(t["status"] == "done" for t in manifest["trials"])


def test_the_old_base_is_let_go_before_the_next_one_loads(write_sweep, fake_training,
                                                          monkeypatch):
    import weakref

    class Model:
        pass

    loaded = []

    def load(trial):
        # two 7B bases at once do not fit one GPU: the previous one must be unreferenced here
        assert all(ref() is None for ref in loaded), "the previous base is still referenced"
        model = Model()
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(runner, "load_base", load)
    spec = load_sweep(write_sweep({"grid": {"train.precision": ["fp32", "bf16"]}}))
    manifest = runner.run_sweep(spec, show_progress=False)
    assert [t["status"] for t in manifest["trials"]] == ["done", "done"], manifest["trials"]
    assert len(loaded) == 2


def test_a_base_that_does_not_load_fails_its_trials_only(spec, fake_training, monkeypatch):
    monkeypatch.setattr(runner, "load_base", lambda trial: (_ for _ in ()).throw(MemoryError("oom")))
    manifest = runner.run_sweep(spec, show_progress=False)
    assert {t["status"] for t in manifest["trials"]} == {"failed"}
    assert "base model: MemoryError: oom" in manifest["trials"][0]["error"]


def test_worker_count(monkeypatch):
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    assert runner.worker_count("auto", 5) == 1  # CPU: in-process
    assert runner.worker_count(2, 5) == 2  # CPU worker processes (tests use this)
    assert runner.worker_count(4, 3) == 3  # never more workers than trials
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["0"])
    assert runner.worker_count("auto", 5) == 1
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["2", "5"])
    assert runner.worker_count("auto", 5) == 2  # one per GPU
    assert runner.worker_count(8, 5) == 2
