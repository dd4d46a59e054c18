"""What bench/eval_speed.py and bench/eval_adapters.py both run: loralab's engine made to
generate an exact number of tokens, timed between device syncs, and random adapters."""

from __future__ import annotations

import time

import torch

from loralab.engine import GenSettings, generate

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD, STOPS = 151643, [151643, 151645]
ENGINE: dict = {}  # what the engine did in the last engine_run (GenStats.engine_dict)


def add_random_adapter(model, name: str, seed: int):
    """A LoRA with non-zero B (PEFT initialises B = 0, which would make merging a no-op)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    if isinstance(model, PeftModel):
        model.add_adapter(name, cfg)
    else:
        model = get_peft_model(model, cfg, adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    for mod_name, param in model.named_parameters():
        if f"lora_B.{name}." in mod_name:
            param.data.copy_(torch.randn(param.shape, generator=gen).to(param) * 0.01)
    return model


def timed(device, fn) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def forced(new: int, batch: int, compile_: bool = False, **kw) -> GenSettings:
    """Settings that generate exactly `new` tokens per prompt (no early stop) with the static
    engine, for token id prompts (no tokenizer here)."""
    return GenSettings(max_new_tokens=new, min_new_tokens=new, batch_size=batch,
                       compile=compile_, engine="static", stop_ids=tuple(STOPS), pad_id=PAD,
                       **kw)


def engine_run(model, prompts, new: int, batch: int, graph=True, compile_=False,
               shared=True, chunks=3, fast=True, lora=None) -> int:
    settings = forced(new, batch, compile_, cuda_graph=graph, shared_prefix=shared,
                      prefill_chunks=chunks, fast_forward=fast)
    _, stats = generate(model, None, prompts, settings, lora)
    ENGINE.clear()
    ENGINE.update(stats.engine_dict())
    return stats.new_tokens
