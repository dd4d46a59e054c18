"""The fast path on CPU: same per-step losses as plain HF + PEFT, levers on or off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loralab.commands.train import demo_config_path
from loralab.config import load_config
from loralab.train.loop import train_adapter

DEMO_CONFIG = demo_config_path()
LEVERS_ON = ["train.packing=on", "train.fused_lora=on", "train.attention=sdpa",
             "train.pack_multiple=32"]


def losses_of(cfg, base) -> tuple[list[float], dict]:
    peft_model, result = train_adapter(cfg, base, show_progress=False)
    peft_model.unload()
    rows = Path(cfg.output_dir, "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x)["loss"] for x in rows], result


def hf_peft_losses(cfg, base, examples) -> list[float]:
    """A plain loop: PEFT's forward, HF's own loss, the loop's batches and optimizer settings."""
    from loralab.data.batching import collate_padded, plan_steps
    from loralab.model.lora import attach_lora
    from loralab.train.schedule import lr_factor, make_schedule

    schedule = make_schedule(cfg, len(examples))
    lengths = [len(e.input_ids) for e in examples]
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    plan = plan_steps(lengths, per_step, 1, cfg.train.seed, 0, cfg.data.shuffle,
                      cfg.train.group_by_length)
    peft_model = attach_lora(base.model, cfg.lora, cfg.train.seed).train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, schedule, "linear"))
    losses = []
    for step in range(schedule.total_steps):
        batch = collate_padded([examples[i] for i in plan[step][0]], base.tokenizer.pad_token_id)
        loss = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    peft_model.unload()
    return losses


def test_fast_levers_give_plain_hf_peft_losses(tiny_base, overrides, tmp_path):
    from loralab.data.summary import build_dataset

    # The plain (levers off) path is pinned by test_train.py's golden losses; here the levers
    # are on and the reference is a loop with no loralab code in the forward or the loss.
    common = [*overrides, "lora.dropout=0", "train.max_steps=2", "train.lr=5e-3"]
    fast = load_config(DEMO_CONFIG, [*common, *LEVERS_ON, f"output_dir={tmp_path / 'fast'}"])
    examples, _ = build_dataset(fast.data, tiny_base.tokenizer, fast.train.seed)
    reference = hf_peft_losses(fast, tiny_base, examples)
    fast_losses, result = losses_of(fast, tiny_base)
    assert result["fast_path"]["packing"] and result["fast_path"]["fused_lora"]
    assert fast_losses == pytest.approx(reference, rel=1e-5)
    assert reference[-1] != pytest.approx(reference[0], rel=1e-4)  # training moved the loss
    assert tiny_base.model.config._attn_implementation == "sdpa"  # levers undone


def test_fast_path_adapter_reloads_in_plain_peft(tiny_base, overrides, tmp_path, assert_reloads_in_plain_peft):
    cfg = load_config(DEMO_CONFIG, [*overrides, *LEVERS_ON, "train.max_steps=1"])
    peft_model, _ = train_adapter(cfg, tiny_base, show_progress=False)
    assert_reloads_in_plain_peft(peft_model, tmp_path / "run")


def test_estimate_prints_both_predictions(small_data):
    from loralab.train.estimate import estimate_lines

    cfg = load_config(DEMO_CONFIG, [f"data.path={small_data}", "data.max_length=256"])
    lines = estimate_lines(cfg, gpu_gib=24)
    text = "\n".join(lines)
    assert "seed's formula 2P + 16 P_LoRA" in text and "16 examples" in text
    assert "train.memory=auto on a 24 GiB card" in text and "micro-batch 16" in text
    assert "training runs with train.memory=auto" in text and "worst case" in text
