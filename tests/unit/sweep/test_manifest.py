from __future__ import annotations

import json

import pytest

from loralab.errors import UserError
from loralab.layout import SweepDir
from loralab.sweep.manifest import (
    mark,
    result_summary,
    save_manifest,
    start_manifest,
    trial_entry,
)
from loralab.sweep.spec import load_sweep


@pytest.fixture
def spec(write_sweep):
    return load_sweep(write_sweep({"grid": {"lora.r": [4, 8, 16]}}))


def test_fresh_manifest_lists_every_trial_pending(spec):
    m = start_manifest(spec, resume=False, overwrite=False)
    assert [t["status"] for t in m["trials"]] == ["pending"] * 3
    assert m["hash"] == spec.definition_hash and m["varying"] == ["lora.r"]
    assert m["trials"][0]["overrides"] == {"lora.r": 4}
    assert m["trials"][0]["path"].endswith("/out/r4")


def test_saved_atomically_and_read_back(spec):
    m = start_manifest(spec, False, False)
    mark(m, "r4", "running")
    mark(m, "r4", "done", result=result_summary({"final_loss": 1.5, "steps": 3, "extra": 1}))
    save_manifest(spec.output_dir, m)
    back = SweepDir(spec.output_dir).read_manifest()
    entry = trial_entry(back, "r4")
    assert entry["status"] == "done" and entry["result"]["final_loss"] == 1.5
    assert "extra" not in entry["result"] and entry["started"] and entry["finished"]
    assert not list(spec.output_dir.glob(".sweep.json*"))  # no temporary file left


def test_resume_keeps_done_and_reruns_the_rest(spec):
    m = start_manifest(spec, False, False)
    mark(m, "r4", "done", result={"final_loss": 1.0})
    mark(m, "r8", "running")  # killed while training
    mark(m, "r16", "failed", error="FloatingPointError: loss is nan")
    save_manifest(spec.output_dir, m)
    resumed = start_manifest(spec, resume=True, overwrite=False)
    assert [t["status"] for t in resumed["trials"]] == ["done", "pending", "pending"]
    assert resumed["trials"][0]["result"] == {"final_loss": 1.0}


def test_same_sweep_again_needs_resume_or_overwrite(spec):
    save_manifest(spec.output_dir, start_manifest(spec, False, False))
    with pytest.raises(UserError, match="--resume"):
        start_manifest(spec, resume=False, overwrite=False)
    assert start_manifest(spec, resume=False, overwrite=True)["trials"][0]["status"] == "pending"
    with pytest.raises(UserError, match="contradict"):
        start_manifest(spec, resume=True, overwrite=True)


def test_a_different_sweep_definition_is_refused_unless_overwrite(spec, write_sweep):
    save_manifest(spec.output_dir, start_manifest(spec, False, False))
    other = load_sweep(write_sweep({"grid": {"lora.r": [4, 32]}}, name="other.yaml"))
    for resume in (False, True):
        with pytest.raises(UserError, match="holds a different sweep"):
            start_manifest(other, resume=resume, overwrite=False)
    assert start_manifest(other, resume=False, overwrite=True)["hash"] == other.definition_hash


def test_run_dirs_without_a_manifest_are_not_overwritten_silently(spec):
    run = spec.output_dir / "r8"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="no sweep.json"):
        start_manifest(spec, False, False)


def test_a_broken_manifest_is_a_user_error(spec):
    spec.output_dir.mkdir(parents=True)
    (spec.output_dir / "sweep.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        SweepDir(spec.output_dir).read_manifest()
    (spec.output_dir / "sweep.json").write_text(json.dumps([1]))
    with pytest.raises(UserError, match="not a sweep manifest"):
        SweepDir(spec.output_dir).read_manifest()
