"""A packed sweep on the tiny model (CPU) against the same trials trained one by one by the
ordinary train path: per-step losses, saved adapters (reloaded with plain PEFT), a trial that
diverges, trials that end at different steps, resume, and the shared base left untouched."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import loralab.sweep.runner as runner
from loralab.commands.train import demo_config_path
from loralab.layout import SweepDir
from loralab.sweep.spec import load_sweep

# Ranks 2/4/8, two learning rates, 4-8 records, 1-3 epochs, two seeds: the trials end after
# 1, 2 and 3 steps of 2 x 2 sequences; the last one's lr sends its weights to inf, so its loss
# is NaN at step 2 (no clipping to stop it).
TRIALS = [
    {"lora.r": 2, "train.lr": 1e-3, "data.limit": 4},
    {"lora.r": 4, "train.lr": 2e-3, "data.limit": 8, "train.seed": 7},
    {"lora.r": 8, "train.lr": 1e-3, "data.limit": 4, "train.epochs": 3, "lora.alpha": 8},
    {"lora.r": 2, "train.lr": 1e30, "data.limit": 8, "train.max_grad_norm": 0},
]
OVERRIDES = {"train.epochs": 1, "train.batch_size": 2, "train.grad_accum": 2,
             "train.save_every": 0, "data.max_length": 128, "tracking.backend": "none",
             "lora.dropout": 0.0}


def _spec(tmp_path, small_data, mode: str, folder: str):
    body = {"name": "p", "base": str(demo_config_path()), "output_dir": str(tmp_path / folder),
            "overrides": {**OVERRIDES, "data.path": str(small_data)}, "trials": TRIALS,
            "sweep": {"mode": mode}}
    path = tmp_path / f"{folder}.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_sweep(path)


def _losses(run) -> list[float]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, small_data, tiny_base):
    """The same trials packed and sequential (the golden side: `train_run` per trial)."""
    tmp = tmp_path_factory.mktemp("packed")
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "load_base", lambda trial: tiny_base)
    try:
        packed = _spec(tmp, small_data, "packed", "packed")
        packed_manifest = runner.run_sweep(packed, show_progress=False)
        after_packed = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
        alone = _spec(tmp, small_data, "sequential", "alone")
        alone_manifest = runner.run_sweep(alone, show_progress=False)
    finally:
        patch.undo()
    return {"packed": packed, "alone": alone, "pm": packed_manifest, "am": alone_manifest,
            "before": before, "after": after_packed, "tiny_base": tiny_base}


def test_statuses_and_steps_match_training_alone(sweeps):
    pm, am = sweeps["pm"], sweeps["am"]
    assert [t["status"] for t in pm["trials"]] == ["done", "done", "done", "failed"]
    assert [t["status"] for t in am["trials"]] == [t["status"] for t in pm["trials"]]
    assert pm["trials"][-1]["error"] == am["trials"][-1]["error"]
    assert "loss is nan at step 2" in pm["trials"][-1]["error"]
    steps = [t["result"]["steps"] for t in pm["trials"][:3]]
    assert steps == [t["result"]["steps"] for t in am["trials"][:3]] == [1, 2, 3]
    assert SweepDir(sweeps["packed"].output_dir).read_manifest() == pm


def test_per_step_losses_equal_the_alone_runs(sweeps):
    worst = 0.0
    for trial in sweeps["packed"].trials:
        packed = _losses(sweeps["packed"].output_dir / trial.name)
        alone = _losses(sweeps["alone"].output_dir / trial.name)
        assert len(packed) == len(alone) > 0
        for p, a in zip(packed, alone, strict=True):
            assert math.isfinite(p)
            worst = max(worst, abs(p - a) / abs(a))
    assert worst < 1e-5, worst  # measured: ~2e-7 (float summation order)


def test_adapters_reload_in_plain_peft_with_the_alone_outputs(sweeps):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.tensor([[151644, 8948, 198, 108386, 151645, 198, 151644, 77091, 198]])
    files = {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "result.json",
             "metrics.jsonl", "data_summary.json"}
    for trial in sweeps["packed"].trials[:3]:
        runs = [folder / trial.name for folder in (sweeps["packed"].output_dir,
                                                   sweeps["alone"].output_dir)]
        assert files <= {p.name for p in runs[0].iterdir()}
        assert json.loads((runs[0] / "result.json").read_text())["status"] == "done"
        logits = []
        for run in runs:
            base_path = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(run))
            with torch.no_grad():
                logits.append(model.eval()(input_ids=probe).logits)
        assert torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5), \
            (logits[0] - logits[1]).abs().max()
    failed = sweeps["packed"].output_dir / sweeps["packed"].trials[3].name
    assert json.loads((failed / "result.json").read_text())["status"] == "failed"


def test_the_shared_base_is_left_as_it_was(sweeps):
    before, after = sweeps["before"], sweeps["after"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model = sweeps["tiny_base"].model
    assert not any("lora" in n for n, _ in model.named_modules())


def test_resume_reruns_only_unfinished_trials(sweeps, monkeypatch):
    spec = sweeps["packed"]
    done_results = {t.name: (spec.output_dir / t.name / "result.json").read_text()
                    for t in spec.trials[:3]}
    monkeypatch.setattr(runner, "load_base", lambda trial: sweeps["tiny_base"])
    manifest = runner.run_sweep(spec, resume=True, show_progress=False)
    assert [t["status"] for t in manifest["trials"]][-1] == "failed"
    for name, text in done_results.items():
        assert (spec.output_dir / name / "result.json").read_text() == text  # not retrained


@pytest.mark.slow
def test_the_benchmark_smoke_runs_on_cpu(tmp_path):
    """bench/packed_sweep.py --smoke: the GPU benchmark's whole path, tiny model, CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(root / "bench" / "packed_sweep.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (tmp_path / "packed_sweep").glob("*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["trials"] for r in rows] == [3, 2, 3]
    assert all(set(r["packed_statuses"].values()) == {"done"} and r["packed_s"] > 0 for r in rows)


def test_ctrl_c_marks_the_packed_trials_interrupted_and_resume_finishes(
        tmp_path, small_data, tiny_base, monkeypatch):
    import loralab.train.packed_step as packed_step

    body = {"name": "c", "base": str(demo_config_path()), "output_dir": str(tmp_path / "c"),
            "overrides": {**OVERRIDES, "data.path": str(small_data), "data.limit": 8},
            "grid": {"lora.r": [2, 4]}, "sweep": {"mode": "packed"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(body))
    spec = load_sweep(path)
    real, calls = packed_step.accumulate_packed_step, []

    def interrupted_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "load_base", lambda trial: tiny_base)
    monkeypatch.setattr(packed_step, "accumulate_packed_step", interrupted_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(spec, show_progress=False)
    saved = SweepDir(spec.output_dir).read_manifest()
    assert [t["status"] for t in saved["trials"]] == ["interrupted", "interrupted"]
    result = json.loads((spec.output_dir / "r2" / "result.json").read_text())
    assert result["status"] == "interrupted" and result["steps"] == 1
    manifest = runner.run_sweep(spec, resume=True, show_progress=False)
    assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
    assert len(_losses(spec.output_dir / "r2")) == 2  # retrained from step 0, metrics not doubled


def test_the_base_stays_in_training_mode_after_a_trial_leaves(tmp_path, small_data, tiny_base,
                                                               monkeypatch):
    """Saving a finished trial puts the shared base in eval mode for the save; the trials
    still training must get it back in training mode (gradient checkpointing, dropout)."""
    import loralab.train.packed_step as packed_step

    body = {"name": "m", "base": str(demo_config_path()), "output_dir": str(tmp_path / "m"),
            "overrides": {**OVERRIDES, "data.path": str(small_data)},
            "trials": [{"data.limit": 4}, {"data.limit": 12}], "sweep": {"mode": "packed"}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(body))
    real, modes = packed_step.accumulate_packed_step, []

    def recording(adapters, lm, *args, **kwargs):
        modes.append((len(adapters.ctx.active), lm.model.layers[0].training))
        return real(adapters, lm, *args, **kwargs)

    monkeypatch.setattr(runner, "load_base", lambda trial: tiny_base)
    monkeypatch.setattr(packed_step, "accumulate_packed_step", recording)
    manifest = runner.run_sweep(load_sweep(path), show_progress=False)
    assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
    assert modes == [(2, True), (1, True), (1, True)]  # the first trial leaves after step 1
    assert not tiny_base.model.training  # and the sweep leaves the base in eval mode


def _write(tmp_path, small_data, folder: str, mode: str, trials: list[dict]):
    body = {"name": folder, "base": str(demo_config_path()), "output_dir": str(tmp_path / folder),
            "overrides": {**OVERRIDES, "data.path": str(small_data)}, "trials": trials,
            "sweep": {"mode": mode}}
    path = tmp_path / f"{folder}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_trials_overflowing_gradient_fails_only_that_trial(tmp_path, small_data, tiny_base,
                                                             monkeypatch):
    """The r=8 trial's gradient is inf at its first step (loss finite); in the shared pass it
    also reaches the other trials' gradients (simulated: NaN), as 0·inf in the GEMMs does.
    Golden: the same trials trained alone, the r=8 one's gradient set to inf at step 1."""
    import loralab.train.loop as loop
    import loralab.train.packed_step as packed_step
    from loralab.train.step import clip_gradients

    trials = [{"lora.r": 2, "data.limit": 8}, {"lora.r": 8, "data.limit": 8},
              {"lora.r": 4, "data.limit": 4}]
    fired = []

    def inf_at_first_step(params, max_norm):  # the alone loop's clip: grads of r=8, step 1
        if params[0].shape[0] == 8 and not fired:
            fired.append(1)
            for p in params:
                p.grad.fill_(math.inf)
        return clip_gradients(params, max_norm)

    monkeypatch.setattr(runner, "load_base", lambda trial: tiny_base)
    monkeypatch.setattr(loop, "clip_gradients", inf_at_first_step)
    alone = runner.run_sweep(load_sweep(_write(tmp_path, small_data, "a", "sequential", trials)),
                             show_progress=False)
    monkeypatch.undo()
    real, first = packed_step.accumulate_packed_step, {}

    def overflowing(adapters, lm, steps, *args, **kwargs):
        stats = real(adapters, lm, steps, *args, **kwargs)
        if 1 in steps and steps[1][0] is first.setdefault(1, steps[1][0]):  # its step 1
            for layer in adapters.layers.values():
                for slot in steps:
                    for param in (layer.lora_A[str(slot)], layer.lora_B[str(slot)]):
                        param.grad.fill_(math.inf if slot == 1 else math.nan)
        return stats

    monkeypatch.setattr(runner, "load_base", lambda trial: tiny_base)
    monkeypatch.setattr(packed_step, "accumulate_packed_step", overflowing)
    spec = load_sweep(_write(tmp_path, small_data, "p", "packed", trials))
    packed = runner.run_sweep(spec, show_progress=False)
    assert [t["status"] for t in alone["trials"]] == ["done", "failed", "done"]
    assert [t["status"] for t in packed["trials"]] == ["done", "failed", "done"]
    assert packed["trials"][1]["error"] == alone["trials"][1]["error"]
    assert "loss is nan at step 2" in packed["trials"][1]["error"]
    for trial in (spec.trials[0], spec.trials[2]):
        mine, theirs = _losses(tmp_path / "p" / trial.name), _losses(tmp_path / "a" / trial.name)
        assert len(mine) == len(theirs) > 0
        assert all(abs(p - a) <= 1e-5 * abs(a) for p, a in zip(mine, theirs, strict=True))


def test_an_update_that_raises_fails_that_trial_as_sequentially(tmp_path, small_data, tiny_base,
                                                                 monkeypatch, capsys):
    """The review's case: lr 1e38 without clipping; AdamW's step raises (float overflow)."""
    from loralab.cli import main

    trials = [{"data.limit": 8}, {"data.limit": 8, "train.lr": 1.0e38, "train.max_grad_norm": 0}]
    monkeypatch.setattr(runner, "load_base", lambda trial: tiny_base)
    seen = {}
    for mode in ("sequential", "packed"):
        path = _write(tmp_path, small_data, mode, mode, trials)
        rc = main(["sweep", str(path), "--quiet"])
        out = "".join(capsys.readouterr().out.split())  # rich wraps long paths anywhere
        seen[mode] = rc, SweepDir(tmp_path / mode).read_manifest()
        assert "1done,1failed;written:" in out, out
        assert all(f in out for f in ("sweep.json", "sweep.md", "sweep.csv", "loss_curves.png")), out
    (rc_seq, seq), (rc_packed, packed) = seen["sequential"], seen["packed"]
    assert rc_seq == rc_packed == 1
    assert [t["status"] for t in packed["trials"]] == ["done", "failed"]
    assert packed["trials"][1]["error"] == seq["trials"][1]["error"]
    name = packed["trials"][0]["name"]
    mine, theirs = _losses(tmp_path / "packed" / name), _losses(tmp_path / "sequential" / name)
    assert len(mine) == len(theirs) == 2
    assert all(abs(p - a) <= 1e-5 * abs(a) for p, a in zip(mine, theirs, strict=True))


def test_a_failing_combined_step_falls_back_to_one_by_one(tmp_path, small_data, tiny_base,
                                                          monkeypatch, capsys):
    """Out of memory in the shared pass: no traceback; the trial that finished keeps its
    result, the unfinished one trains alone from its start, and the sweep's files are written."""
    import loralab.train.packed_step as packed_step
    from loralab.cli import main

    real, calls = packed_step.accumulate_packed_step, []

    def out_of_memory_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB.\nSee the docs")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "load_base", lambda trial: tiny_base)
    monkeypatch.setattr(packed_step, "accumulate_packed_step", out_of_memory_at_step_2)
    path = _write(tmp_path, small_data, "f", "packed", [{"data.limit": 4}, {"data.limit": 8}])
    rc = main(["sweep", str(path), "--quiet"])
    out = "".join(capsys.readouterr().out.split())  # rich wraps long lines anywhere
    assert rc == 0, out
    assert ("packedtrainingstopped(RuntimeError:CUDAoutofmemory.Triedtoallocate20.00GiB.):"
            "1unfinishedtrial(s)trainonebyone") in out, out
    assert "2done;written:" in out and "loss_curves.png" in out
    manifest = SweepDir(tmp_path / "f").read_manifest()
    assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
    steps = [len(_losses(tmp_path / "f" / t["name"])) for t in manifest["trials"]]
    assert steps == [1, 2]  # the second retrained from step 0 alone, its metrics not doubled
    assert not tiny_base.model.training
    assert not any("lora" in n for n, _ in tiny_base.model.named_modules())
