"""Real sweeps on the tiny random Qwen2 model (CPU): one base load, resume, worker processes."""

from __future__ import annotations

import json

import pytest
import yaml

import loralab.model.load as model_load
from loralab.cli import main
from loralab.commands.train import demo_config_path
from loralab.layout import SweepDir

TINY = ["train.max_steps=1", "train.batch_size=2", "train.grad_accum=1", "train.save_every=0",
        "data.max_length=256", "tracking.backend=none", "--quiet"]


def _sweep_file(tmp_path, **extra):
    body = {"name": "t", "base": str(demo_config_path()), "output_dir": str(tmp_path / "sw"),
            "grid": {"lora.r": [2, 4]}, "overrides": {"data.limit": 4}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_sweep_trains_every_trial_on_one_loaded_base(tmp_path, monkeypatch):
    loads = []
    real = model_load.load_base_model
    monkeypatch.setattr(model_load, "load_base_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    path = _sweep_file(tmp_path)
    assert main(["sweep", str(path), *TINY]) == 0
    assert len(loads) == 1
    sw = tmp_path / "sw"
    manifest = SweepDir(sw).read_manifest()
    assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
    for trial in manifest["trials"]:
        run = sw / trial["name"]
        assert (run / "adapter_config.json").is_file() and (run / "metrics.jsonl").is_file()
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "done" and trial["result"]["final_loss"] == result["final_loss"]
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["lora"]["r"] == trial["overrides"]["lora.r"]
        assert saved["tracking"]["group"] == "t" and saved["tracking"]["experiment"] == trial["name"]
    adapters = [json.loads((sw / n / "adapter_config.json").read_text())["r"] for n in ("r2", "r4")]
    assert adapters == [2, 4]  # fresh LoRA per trial, the previous one unloaded
    for name in ("sweep.md", "sweep.csv", "loss_curves.png"):
        assert (sw / name).is_file()

    assert main(["sweep", str(path), *TINY]) == 2  # same sweep again: needs --resume/--overwrite
    loads.clear()
    assert main(["sweep", str(path), *TINY, "--resume"]) == 0
    assert loads == []  # everything done: nothing loaded, nothing rerun


def test_parallel_workers_on_cpu(tmp_path):
    """Two spawned CPU worker processes (the multi-GPU code path, minus the GPUs)."""
    path = _sweep_file(tmp_path, sweep={"parallel": 2})
    assert main(["sweep", str(path), *TINY]) == 0
    manifest = SweepDir(tmp_path / "sw").read_manifest()
    assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
    assert sorted(t["worker"] for t in manifest["trials"]) == [0, 1]
    assert all((tmp_path / "sw" / t["name"] / "adapter_model.safetensors").is_file()
               for t in manifest["trials"])


@pytest.mark.slow
def test_demo_sweep_file_runs(tmp_path, monkeypatch):
    from importlib import resources

    monkeypatch.chdir(tmp_path)
    demo = resources.files("loralab") / "resources" / "configs" / "sweeps" / "demo.yaml"
    assert main(["sweep", str(demo), "tracking.backend=none", "--quiet"]) == 0
    manifest = SweepDir(tmp_path / "runs" / "sweeps" / "demo").read_manifest()
    assert len(manifest["trials"]) == 4 and {t["status"] for t in manifest["trials"]} == {"done"}
