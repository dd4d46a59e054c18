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

from loralab.config import load_config
from loralab.data.summary import build_dataset
from loralab.model.load import TINY_QWEN2
from loralab.model.memory import CARD_SHARE, GIB
from loralab.model.tokenizer import builtin_tokenizer_dir, load_tokenizer
from loralab.train import levers
from loralab.train.cli import demo_config_path
from loralab.train.estimate_cli import gpu_plans, model_shape

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
