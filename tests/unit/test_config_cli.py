"""Issue 16 items 6-7: `loralab config` shows where each value came from; names from other
tools get loralab's key."""

from __future__ import annotations

import pytest
import yaml

from loralab.cli import main
from loralab.config import load_config
from loralab.errors import UserError


def test_config_prints_the_resolved_yaml_with_each_values_origin(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: x.json}\nlora: {r: 4}\ntrain: {lr: 2.0e-4}\n")
    assert main(["config", str(path), "lora.r=16", "tracking.experiment=2024"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if "#" in line}
    assert lines["r"].endswith("16  # override")
    assert lines["lr"].endswith("# file") and lines["alpha"].endswith("32  # default")
    assert lines["experiment"].endswith("'2024'  # override")
    resolved = yaml.safe_load(out)  # the comments aside, it is the config loralab would run
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(resolved))
    assert load_config(again) == load_config(path, ["lora.r=16", "tracking.experiment=2024"])


def test_config_of_an_invalid_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: x.json}\ntrain: {lr: .inf}\n")
    assert main(["config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == \
        "loralab: error: train.lr must be a finite number, got inf"


@pytest.mark.parametrize("item, message", [
    ("learning_rate=1e-4", "unknown config key learning_rate: loralab calls it train.lr"),
    ("train.learning_rate=1e-4", "train.learning_rate: loralab calls it train.lr"),
    ("num_train_epochs=3", "loralab calls it train.epochs"),
    ("per_device_train_batch_size=2", "loralab calls it train.batch_size"),
    ("gradient_accumulation_steps=8", "loralab calls it train.grad_accum"),
    ("lora_rank=16", "loralab calls it lora.r"),
    ("lora.lora_alpha=16", "loralab calls it lora.alpha"),
    ("cutoff_len=1024", "loralab calls it data.max_length"),
    ("lora_dropout=0.05", "loralab calls it lora.dropout"),
    ("lora_target=all", "loralab calls it lora.target_modules"),
])
def test_names_from_other_tools_are_refused_naming_loralabs_key(item, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        load_config(None, ["data.path=x.json", item])


def test_a_typo_still_gets_the_nearest_key():
    with pytest.raises(UserError, match="did you mean output_dir"):
        load_config(None, ["data.path=x.json", "ouput_dir=x"])
