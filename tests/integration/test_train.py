"""`loralab train` end to end on CPU: files, golden losses, what changes and what must not."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loralab.cli import main
from loralab.commands.train import demo_config_path
from loralab.config import load_config
from loralab.train.loop import train_adapter, train_run

DATA_DIR = demo_config_path().parents[1] / "data"

DEMO_CONFIG = demo_config_path()

# First losses of the tiny model (seed 1234) on the first 16 bundled eval records, bs 4 x GA 2,
# lr 2e-3, seed 42, recorded once with torch 2.13 CPU. A change here means the math changed.
GOLDEN_LOSSES = [11.966077, 11.873543]


def test_train_cli_writes_a_complete_run(overrides, small_data, tmp_path, capsys):
    held_out = ["train.eval_every=2", f"data.eval_path={small_data}"]
    assert main(["train", str(DEMO_CONFIG), *overrides, *held_out, "--quiet"]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl",
                 "result.json", "data_summary.json", "tokenizer_config.json"):
        assert (run / name).is_file(), name
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "done" and result["steps"] == 2
    assert result["versions"]["torch"] and "git_commit" in result
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == pytest.approx(GOLDEN_LOSSES, rel=1e-4)
    for key in ("lr", "grad_norm", "tokens_per_s", "epoch", "memory_gb"):
        assert key in rows[0]
    # The held-out loss comes every train.eval_every steps, dropout off, on the eval file.
    assert "eval_loss" not in rows[0] and 11 < rows[1]["eval_loss"] < 13
    # The saved config is the resolved one and reads back to the same Config.
    saved = load_config(run / "config.yaml")
    assert saved == load_config(DEMO_CONFIG, [*overrides, *held_out])
    adapter_cfg = json.loads((run / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 32
    assert sorted(adapter_cfg["target_modules"]) == sorted(saved.lora.target_modules)


def test_only_lora_weights_change(tiny_base, overrides):
    cfg = load_config(DEMO_CONFIG, overrides)
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    peft_model, _ = train_adapter(cfg, tiny_base, show_progress=False)
    trained = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.unload()
    after = tiny_base.model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"base weight {key} changed"
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B starts at 0 and must move"


def test_saved_adapter_reloads_in_plain_peft(tiny_base, overrides, tmp_path, assert_reloads_in_plain_peft):
    cfg = load_config(DEMO_CONFIG, overrides)
    peft_model, _ = train_adapter(cfg, tiny_base, show_progress=False)
    assert_reloads_in_plain_peft(peft_model, tmp_path / "run")


def test_gradient_accumulation_is_token_normalised(tiny_base, small_data):
    """bs 4 x GA 4 and bs 16 x GA 1 give the same loss and the same gradients."""
    from loralab.data.summary import build_dataset
    from loralab.model.lora import LabelledLoss, attach_lora
    from loralab.train.dist import Dist
    from loralab.train.step import accumulate_step

    cfg = load_config(DEMO_CONFIG, [f"data.path={small_data}", "lora.dropout=0", "data.max_length=256"])
    examples, _ = build_dataset(cfg.data, tiny_base.tokenizer, 0)
    results = []
    for micro in ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]], [list(range(16))]):
        peft_model = attach_lora(tiny_base.model, cfg.lora, seed=0)
        # lora_B starts at zero, which would make lora_A's gradient zero: perturb it.
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(1))
        loss_module = LabelledLoss(peft_model, chunk=97)
        stats = accumulate_step(Dist(), loss_module, examples, micro, tiny_base.tokenizer.pad_token_id)
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((stats.loss_sum / stats.tokens, grads))
        peft_model.unload()
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-8), name


def test_dry_run_writes_summary_and_trains_nothing(overrides, tmp_path):
    assert main(["train", str(DEMO_CONFIG), *overrides, "--dry-run"]) == 0
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["records"] == 16 and summary["kept"] == 16
    assert {"truncated", "skipped", "tokens"} <= summary.keys()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    # The README's order: check with --dry-run, then train into the same folder.
    assert main(["train", str(DEMO_CONFIG), *overrides, "--quiet"]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_refuses_to_overwrite_a_run_unless_asked(overrides, tmp_path, capsys):
    assert main(["train", str(DEMO_CONFIG), *overrides, "--quiet"]) == 0
    first = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    assert main(["train", str(DEMO_CONFIG), *overrides, "lora.r=4", "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == first
    assert main(["train", str(DEMO_CONFIG), *overrides, "lora.r=4", "--quiet", "--overwrite"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lora"]["r"] == 4
    assert load_file(str(tmp_path / "run" / "adapter_model.safetensors"))


def test_train_run_leaves_base_reusable(tiny_base, overrides, tmp_path):
    """A sweep trains many adapters on one base: the second run sees a clean model."""
    cfg = load_config(DEMO_CONFIG, overrides)
    first = train_run(cfg, base=tiny_base, show_progress=False)
    cfg2 = load_config(DEMO_CONFIG, [*overrides, f"output_dir={tmp_path / 'run2'}"])
    second = train_run(cfg2, base=tiny_base, show_progress=False)
    assert first["first_loss"] == pytest.approx(second["first_loss"], rel=1e-6)
    assert not any("lora" in n for n, _ in tiny_base.model.named_parameters())


def test_dry_run_of_a_mix_of_files(overrides, small_data, tmp_path):
    """data.path as a list: the files in order, each with its own limit."""
    other = DATA_DIR / "tag_scores_train.json"
    mixed = [o for o in overrides if not o.startswith("data.path")]
    mixed.append(f"data.path=[{small_data}, {{path: {other}, limit: 3}}]")
    assert main(["train", str(DEMO_CONFIG), *mixed, "--dry-run"]) == 0
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["records"] == 16 + 3 and summary["path"] == f"{small_data}, {other}"
