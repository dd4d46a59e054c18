"""sweep.mode: validation, which trials can train packed, auto's rule, the dry run's line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loralab.cli import main
from loralab.errors import UserError
from loralab.sweep.mode import choose, combined_config, unpackable
from loralab.sweep.spec import load_sweep


def test_mode_is_validated_and_defaults_to_auto(write_sweep):
    assert load_sweep(write_sweep({"grid": {"lora.r": [4, 8]}})).mode == "auto"
    spec = load_sweep(write_sweep({"grid": {"lora.r": [4, 8]}}), ["sweep.mode=packed"])
    assert spec.mode == "packed"
    with pytest.raises(UserError, match="sweep.mode must be one of auto, packed, sequential"):
        load_sweep(write_sweep({"grid": {"lora.r": [4]}, "sweep": {"mode": "together"}}))


def test_packed_refuses_trials_that_cannot_share_a_pass(write_sweep):
    body = {"grid": {"lora.target_modules": [["q_proj"], ["v_proj"]]}, "sweep": {"mode": "packed"}}
    with pytest.raises(UserError, match="trials target different modules"):
        load_sweep(write_sweep(body))
    auto = load_sweep(write_sweep({**body, "sweep": {"mode": "auto"}}))
    assert choose("auto", auto.trials, cuda=True).mode == "sequential"


def test_what_may_differ_and_what_may_not(write_sweep):
    spec = load_sweep(write_sweep({"trials": [
        {"lora.r": 4, "train.lr": 1e-4, "lora.dropout": 0.0, "data.limit": 1},
        {"lora.r": 32, "train.lr": 2e-4, "train.epochs": 2, "train.scheduler": "cosine",
         "lora.alpha": 8, "train.batch_size": 2},
    ]}))
    assert unpackable(spec.trials) == []
    combined = combined_config(spec.trials)
    assert combined.lora.r == 36 and combined.train.grad_accum == 1
    assert combined.train.batch_size == 4 * 4 + 2 * 4  # every trial's effective batch
    differ = load_sweep(write_sweep({"grid": {"train.packing": ["on", "off"]}}))
    assert any("train.packing" in why for why in unpackable(differ.trials))
    bases = load_sweep(write_sweep({"grid": {"model.dtype": ["bf16", "fp32"]}}))
    assert unpackable(bases.trials) == ["trials use different base models or precisions"]


def test_auto_rule(write_sweep):
    trials = load_sweep(write_sweep({"grid": {"lora.r": [4, 8, 16]}})).trials  # 16 rows each
    assert choose("auto", trials, cuda=False).mode == "sequential"  # CPU: no launch overhead
    fits = SimpleNamespace(grad_accum=2, predicted_gib={"total": 12.5})
    choice = choose("auto", trials, cuda=True, planned=fits)
    assert (choice.mode, choice.together, choice.micro_batches) == ("packed", 3, 2)
    assert choice.predicted_gib == 12.5
    tight = SimpleNamespace(grad_accum=48, predicted_gib={"total": 70.0})  # 1 row per micro-batch
    assert choose("auto", trials, cuda=True, planned=tight).mode == "sequential"
    assert choose("packed", trials, cuda=False).mode == "packed"
    assert choose("sequential", trials, cuda=True, planned=fits).mode == "sequential"
    assert choose("auto", trials, cuda=True, planned=fits, base_params=1_540_000_000).mode == "packed"
    big = choose("auto", trials, cuda=True, planned=fits, base_params=7_620_000_000)
    assert big.mode == "sequential" and "7.6B" in big.reason
    assert choose("packed", trials, cuda=True, planned=fits, base_params=7_620_000_000).mode == "packed"


def test_dry_run_says_the_mode(write_sweep, capsys):
    from loralab.commands.train import demo_config_path

    path = write_sweep({"base": str(demo_config_path()), "grid": {"lora.r": [4, 8]},
                        "overrides": {"data.limit": 8}, "sweep": {"mode": "packed"}})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "mode: packed, 2 trials together" in out and "predicted peak" in out
    assert main(["sweep", str(path), "sweep.mode=sequential", "--dry-run"]) == 0
    assert "mode: sequential" in capsys.readouterr().out

