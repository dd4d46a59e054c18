"""The seed's four studies ship as sweep files that validate as they are."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from loralab.sweep.spec import load_sweep

SWEEPS = Path(str(resources.files("loralab") / "resources" / "configs" / "sweeps"))


@pytest.mark.parametrize(
    ("name", "trials"),
    [
        ("data_size", ["limit50", "limit100", "limit500", "limitall"]),
        ("epochs", ["ep1", "ep2", "ep4"]),
        ("lr", ["lr1e-5", "lr1e-4", "lr1e-3"]),
        ("rank", ["r4", "r8", "r16", "r32"]),
        ("demo", ["r4_limit16", "r4_limit32", "r8_limit16", "r8_limit32"]),
    ],
)
def test_shipped_sweep_files(name, trials):
    spec = load_sweep(SWEEPS / f"{name}.yaml")
    assert [t.name for t in spec.trials] == trials
    assert spec.name == name and spec.output_dir == Path("runs/sweeps") / name
    for trial in spec.trials:
        cfg = trial.config
        assert (cfg.lora.r, cfg.train.lr, cfg.train.epochs) == (
            trial.overrides.get("lora.r", 8),
            trial.overrides.get("train.lr", 5e-3 if name == "demo" else 1e-4),
            trial.overrides.get("train.epochs", 1 if name == "demo" else 4),
        )
    if name == "data_size":
        assert [t.config.data.limit for t in spec.trials] == [50, 100, 500, None]
