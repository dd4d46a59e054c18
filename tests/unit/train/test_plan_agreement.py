"""`loralab estimate` and the training loop plan with one function: they cannot drift.

The loop's `levers.resolve` (given a model, a device and examples) and estimate's `gpu_plans`
(given only config.json and the data's lengths) must choose the same levers and predict the same
peak, with packing on and off, on a GPU (simulated: the card budget and attention backend are
what a GPU would report) and on the CPU, where training plans no memory.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from loralab.commands.train import demo_config_path
from loralab.config import load_config
from loralab.data.summary import build_dataset
from loralab.model.load import TINY_QWEN2
from loralab.model.memory import CARD_SHARE, GIB
from loralab.model.tokenizer import builtin_tokenizer_dir, load_tokenizer
from loralab.train import levers
from loralab.train.estimate import gpu_plans, model_shape

CARD_GIB = 0.25  # small enough that memory auto must choose (the tiny model's steps are small)


@pytest.fixture(scope="module")
def tiny_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2))


def _config(*overrides):
    data = demo_config_path().parents[1] / "data" / "tag_scores_train.json"
    return load_config(demo_config_path(), [f"data.path={data}", "data.limit=64",
                                            "train.batch_size=16", "train.grad_accum=1",
                                            *overrides])


@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("memory", ["fixed", "auto"])
def test_estimate_plans_what_training_plans_on_a_gpu(monkeypatch, tiny_model, packing, memory):
    cfg = _config(f"train.packing={packing}", f"train.memory={memory}")
    examples, _ = build_dataset(cfg.data, load_tokenizer(str(builtin_tokenizer_dir())), 0)
    monkeypatch.setattr(levers, "card_budget", lambda device: int(CARD_GIB * GIB * CARD_SHARE))
    monkeypatch.setattr("loralab.model.attention.pick_backend", lambda choice, device: "varlen")
    trained = levers.resolve(cfg, tiny_model, torch.device("cuda"), examples)

    lengths = [len(e.input_ids) for e in examples]
    labelled = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]
    given, auto, _ = gpu_plans(cfg, model_shape(cfg), lengths, labelled, CARD_GIB)
    estimated = auto if memory == "auto" else given
    assert dataclasses.asdict(estimated) | {"predicted": None} == \
        dataclasses.asdict(trained) | {"predicted": None}
    assert estimated.predicted_gib["total"] > 0
    if memory == "auto":
        assert trained.micro_batch < 16  # the card made it choose: the test covers the choice


def test_on_the_cpu_training_plans_no_memory(tiny_model):
    cfg = _config()
    examples, _ = build_dataset(cfg.data, load_tokenizer(str(builtin_tokenizer_dir())), 0)
    fast = levers.resolve(cfg, tiny_model, torch.device("cpu"), examples)
    assert (fast.packing, fast.compile, fast.fused_lora, fast.predicted_gib) == (False, False,
                                                                                  False, None)
    assert (fast.micro_batch, fast.grad_accum) == (16, 1)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("processes", [1, 2])
def test_memory_is_planned_for_the_micro_batches_the_loop_collates(packing, processes):
    """RunBatches' largest micro-batch is the largest tensor the loop's steps put on a card
    (their plan, each process's share, collated padded or packed): estimate and the plan see
    the steps that will run, not only the data's worst case."""
    from loralab.data.batching import collate_for_model
    from loralab.train.schedule import StepPlan, make_schedule
    from loralab.train.step import process_shard

    cfg = _config("train.batch_size=4", "train.grad_accum=2", "train.max_steps=5")
    examples, _ = build_dataset(cfg.data, load_tokenizer(str(builtin_tokenizer_dir())), 0)
    lengths = [len(e.input_ids) for e in examples]
    labelled = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]
    batches = levers.RunBatches(cfg, lengths, labelled, packing, 64, processes)
    for micro in (8, 4, 2):
        plan = StepPlan.for_run(cfg, lengths, micro, 8 // micro)
        seen = (0, 0)
        for index in range(make_schedule(cfg, len(examples)).total_steps):
            for rank in range(processes):
                for mb in process_shard(plan.step(index), rank, processes, dict(enumerate(lengths))):
                    batch = collate_for_model([examples[i] for i in mb], 0, packing, 64)
                    seen = max(seen, (batch["input_ids"].numel(),
                                      int((batch["labels"][:, 1:] != -100).sum())))
        assert batches.largest(micro) == seen


def test_the_run_s_largest_step_is_planned_and_the_worst_case_reported(monkeypatch, tiny_model):
    """Few steps over varied lengths: the run's largest micro-batch is below the data's worst
    case (its longest sequences together); the plan's peak is the former, both are reported."""
    cfg = _config("train.packing=on", "train.memory=fixed", "train.max_steps=2",
                  "data.limit=null")
    lengths = [20 + 7 * (i % 40) for i in range(200)]
    labelled = [n // 4 for n in lengths]
    shape = model_shape(cfg)
    fast = levers.plan(cfg, True, "varlen", shape, lengths, labelled, int(80 * GIB))
    largest = levers.RunBatches(cfg, lengths, labelled, True, fast.pad_multiple).largest(16)
    assert fast.predicted.tokens == largest[0] < sum(sorted(lengths)[-16:])
    assert fast.predicted_gib["total"] <= fast.worst_case_gib
