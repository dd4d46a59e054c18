from __future__ import annotations

import pytest

import loralab.model.load as model_load
from loralab.cli import main


@pytest.fixture
def real_data_sweep(write_sweep):
    """A sweep on the bundled demo records (the dry run tokenises them)."""
    from loralab.commands.train import demo_config_path

    return write_sweep({"base": str(demo_config_path()), "grid": {"data.limit": [8, 16, None]},
                        "overrides": {"train.epochs": 2}})


def test_dry_run_lists_trials_and_work_without_loading_weights(real_data_sweep, capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("--dry-run loaded model weights")

    monkeypatch.setattr(model_load, "load_base_model", no_weights)
    args = ["sweep", str(real_data_sweep), "train.batch_size=2", "train.grad_accum=2", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "limit8" in out and "limit16" in out and "limitall" in out and "3 trials" in out
    # limit8: 8 records x 2 epochs = 4 steps of 2x2 sequences; tokens = 16 sequences x mean length
    row = next(line for line in out.splitlines() if "limit8 " in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[2:4] == ["8", "4"]
    assert 16 * 100 < int(cells[4].replace(",", "")) < 16 * 600
    assert not (real_data_sweep.parent / "out").exists()  # nothing written


def test_bad_sweep_is_one_line_and_exit_2(write_sweep, capsys):
    assert main(["sweep", str(write_sweep({"grid": {"lora.rank": [4]}}))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean lora.r?" in err
    assert main(["sweep", "/nonexistent/sweep.yaml"]) == 2


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    for option in ("--dry-run", "--resume", "--overwrite", "sweep.parallel"):
        assert option in out
