"""A run killed with SIGKILL resumes from its last checkpoint to the same adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.cli import main
from loralab.commands.train import demo_config_path
from loralab.errors import UserError

# tests/integration/kill_at_step/sitecustomize.py kills the process at the end of step 3.
KILL_AT_STEP_3 = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "kill_at_step"),
                                                 os.environ.get("PYTHONPATH")])),
                  "KILL_AT_STEP": "3"}


def _train_cmd(overrides, *extra):
    return [sys.executable, "-m", "loralab.cli", "train", str(demo_config_path()), *overrides, "--quiet", *extra]


def test_killed_run_resumes_to_the_same_adapter(overrides, tmp_path):
    # Dropout stays on (0.1) so the test also proves the RNG state is restored.
    common = [o for o in overrides if not o.startswith(("train.max_steps", "output_dir"))]
    common += ["train.max_steps=5", "train.save_every=2"]
    killed = tmp_path / "killed"
    env = {**os.environ, **KILL_AT_STEP_3}
    proc = subprocess.run(_train_cmd([*common, f"output_dir={killed}"]), env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((killed / "result.json").read_text())["status"] == "running"
    assert not (killed / "adapter_model.safetensors").exists(), "a killed run must not look complete"
    assert [p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-0000002"]

    assert main(["train", str(demo_config_path()), *common, f"output_dir={killed}", "--quiet", "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", str(demo_config_path()), *common, f"output_dir={straight}", "--quiet"]) == 0

    a = load_file(str(killed / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    losses_a = [json.loads(line)["loss"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    losses_b = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(x - y) < 1e-5 for x, y in zip(losses_a, losses_b, strict=True))
    assert json.loads((killed / "result.json").read_text())["status"] == "done"


def test_resume_refuses_a_changed_config(overrides, tmp_path, capsys):
    assert main(["train", str(demo_config_path()), *overrides, "--quiet"]) == 0
    assert main(["train", str(demo_config_path()), *overrides, "lora.r=16", "--quiet", "--resume"]) == 2
    assert "lora.r" in capsys.readouterr().err


def test_a_run_of_an_older_loralab_resumes(overrides, tmp_path):
    """Its config.yaml lacks keys added since (they had their defaults): not a changed config."""
    import yaml

    from loralab.train.checkpoint import check_resume_config

    common = [o for o in overrides if not o.startswith("train.max_steps")]
    assert main(["train", str(demo_config_path()), *common, "train.max_steps=2", "--quiet"]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    new = {**saved, "train": dict(saved["train"])}
    for key in ("strategy", "keep_checkpoints", "early_stopping_patience"):
        del saved["train"][key]  # as written before these keys existed
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resume_config(run, new)  # no error
    new["train"]["keep_checkpoints"] = 5  # a real change is still refused
    with pytest.raises(UserError, match="keep_checkpoints"):
        check_resume_config(run, new)
