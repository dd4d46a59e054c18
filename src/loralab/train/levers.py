"""The fast path's levers: resolve `auto` settings for this device and data, apply, undo.

Each lever is a TrainConfig key; `auto` means on for CUDA and the plain path on CPU (so the
CPU tests' default numbers are those of HF + PEFT). None of them changes the math: packing
keeps attention inside each sequence, the fused LoRA forward computes PEFT's function, and the
micro-batch chosen by `memory: auto` divides the effective batch (loss is token-normalised).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loralab.model.fast_lora import mark_ranks_dynamic
from loralab.model.memory import (
    Estimate,
    ModelShape,
    StepShape,
    card_budget,
    divisors_desc,
    estimate,
    plan_memory,
    shape_of,
    worst_micro_batch,
)

CUDA_PACK_MULTIPLE = 64  # packed rows are filled to a multiple of this on CUDA (few shapes)


@dataclass
class FastPath:
    """The levers as resolved for one run."""

    packing: bool
    attention: str  # varlen | flex | sdpa (packed rows only)
    fused_lora: bool
    compile: bool
    checkpointing: bool
    micro_batch: int
    grad_accum: int
    labelled_only: bool
    pad_multiple: int
    predicted_gib: dict[str, float] | None = None  # the run's largest micro-batch, by part
    worst_case_gib: float | None = None  # the data's longest sequences in one micro-batch
    predicted: Estimate | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "predicted"}


def _on(value: str, cuda: bool) -> bool:
    return value == "on" or (value == "auto" and cuda)


def resolve(
    cfg: Any, model: torch.nn.Module, device: torch.device, examples: list, processes: int = 1
) -> FastPath:
    """Turn the config's auto|on|off levers into concrete choices for this device and data.

    With several processes, memory is planned for one process's share of a step's sequences.
    """
    from loralab.model.attention import pick_backend

    cuda = device.type == "cuda"
    lengths = [len(e.input_ids) for e in examples]
    labelled = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]
    held = [_held(p) for p in model.parameters()]
    shape = shape_of(model.config, sum(n for n, _ in held)) if cuda else None
    if any(sharded for _, sharded in held):  # FSDP runs the plain PEFT forward, uncompiled
        train = dataclasses.replace(cfg.train, fused_lora="off", compile="off")
        cfg = dataclasses.replace(cfg, train=train)
    return plan(cfg, cuda, pick_backend(cfg.train.attention, device), shape, lengths, labelled,
                card_budget(device) if cuda else 0, processes)


def plan(
    cfg: Any, cuda: bool, backend: str, shape: ModelShape | None, lengths: list[int],
    labelled: list[int], budget: int, processes: int = 1,
) -> FastPath:
    """The levers for a device kind and the data, and the peak memory they are predicted to
    reach: what training runs with, and what `loralab estimate` prints (one function, so the
    two cannot drift). `backend` is the attention used for packed rows; `shape` None (CPU):
    no memory planning. Memory is planned for the largest micro-batch the run's batch plan
    will give any process (`RunBatches`), not for the data's worst case (its longest
    sequences together), which is reported beside it."""
    tcfg = cfg.train
    packing = _on(tcfg.packing, cuda)
    attention = backend if packing else "sdpa"
    fused = _on(tcfg.fused_lora, cuda) and not cfg.lora.dora
    pad_multiple = tcfg.pack_multiple if tcfg.pack_multiple else (CUDA_PACK_MULTIPLE if cuda else 1)
    step = step_shape(cfg, fused, _keeps_kv_heads(attention, packing, cuda), _on(tcfg.compile, cuda))
    micro, accum = tcfg.batch_size, tcfg.grad_accum
    ckpt = tcfg.gradient_checkpointing == "on"
    predicted = worst = None
    if shape is not None:
        batches = RunBatches(cfg, lengths, labelled, packing, pad_multiple, processes)
        effective, share = micro * accum, -(-micro * accum // processes)
        if tcfg.memory == "auto":  # micro-batches divide the step; none is above a share
            sizes = [d for d in divisors_desc(effective) if d <= share]
            chosen = plan_memory(shape, batches.largest, sizes, budget, step,
                                 tcfg.gradient_checkpointing)
            micro, ckpt = chosen.micro_batch, chosen.checkpointing
            accum = effective // micro
        predicted = estimate(shape, *batches.largest(micro), micro, ckpt, step)
        worst = estimate(shape, *worst_micro_batch(lengths, labelled, min(micro, share), packing,
                                                   pad_multiple), micro, ckpt, step)
    return FastPath(
        packing=packing,
        attention=attention,
        fused_lora=fused,
        compile=_on(tcfg.compile, cuda),
        checkpointing=ckpt,
        micro_batch=micro,
        grad_accum=accum,
        labelled_only=tcfg.labelled_logits,
        pad_multiple=pad_multiple if packing else 1,
        predicted_gib=predicted.gib() if predicted else None,
        worst_case_gib=worst.gib()["total"] if worst else None,
        predicted=predicted,
    )


def _held(p: torch.nn.Parameter) -> tuple[int, bool]:
    """(elements this process holds of a parameter, whether it is a shard): memory is
    planned for what one process holds."""
    local = getattr(p, "to_local", None)  # a DTensor: FSDP's shard of the whole
    return (local().numel(), True) if local else (p.numel(), False)


class RunBatches:
    """The micro-batches a run will train on, for any micro-batch size: what memory is planned
    for. Built from the loop's own pieces (`StepPlan` over the run's steps, `process_shards`
    for every process), so the plan sees the steps that will run, before any weights load."""

    def __init__(self, cfg: Any, lengths: list[int], labelled: list[int], packed: bool,
                 pad_multiple: int, processes: int = 1) -> None:
        from loralab.train.schedule import make_schedule

        self.cfg, self.lengths, self.labelled = cfg, lengths, labelled
        self.packed, self.pad_multiple, self.processes = packed, pad_multiple, processes
        self.steps = make_schedule(cfg, len(lengths)).total_steps
        self._largest: dict[int, tuple[int, int]] = {}

    def largest(self, micro_batch: int) -> tuple[int, int]:
        """(tokens incl. padding, labelled) of the largest micro-batch any process will run
        with micro-batches of `micro_batch` sequences (compared as the loop records it)."""
        if micro_batch not in self._largest:
            from loralab.train.schedule import StepPlan
            from loralab.train.step import process_shards

            effective = self.cfg.train.batch_size * self.cfg.train.grad_accum
            plan = StepPlan.for_run(self.cfg, self.lengths, micro_batch, effective // micro_batch)
            by_index = dict(enumerate(self.lengths)) if self.processes > 1 else None
            self._largest[micro_batch] = max(
                (self._size(mb) for index in range(self.steps)
                 for shard in process_shards(plan.step(index), self.processes, by_index)
                 for mb in shard),
                default=(0, 0),
            )
        return self._largest[micro_batch]

    def _size(self, micro_batch: list[int]) -> tuple[int, int]:
        """As data/batching.py collates it: one packed row filled to pad_multiple, or padded
        rows as wide as the longest."""
        lengths = [self.lengths[i] for i in micro_batch]
        if self.packed:
            tokens = sum(lengths)
            tokens += -tokens % max(1, self.pad_multiple)
        else:
            tokens = len(lengths) * max(lengths)
        return tokens, sum(self.labelled[i] for i in micro_batch)


def _keeps_kv_heads(attention: str, packing: bool, cuda: bool) -> bool:
    """Whether attention runs on the KV heads as they are (varlen/flex, or SDPA's GQA path on
    CUDA for padded rows) rather than on heads repeated to the query count (the SDPA mask path)."""
    return attention != "sdpa" or (not packing and cuda)


def step_shape(cfg: Any, fused: bool, kv_heads_kept: bool, compiled: bool) -> StepShape:
    return StepShape(
        compiled=compiled,
        fused_lora=fused,
        dropout=cfg.lora.dropout,
        varlen_attention=kv_heads_kept,
        labelled_only=cfg.train.labelled_logits,
        loss_chunk=cfg.train.loss_chunk,
        r=cfg.lora.r,
        targets=tuple(cfg.lora.target_modules),
    )


def predict_peak_gib(cfg: Any, model: torch.nn.Module, fast: FastPath, tokens: int,
                     labelled: int) -> float:
    """loralab's memory model for a micro-batch of this size run with these levers."""
    from loralab.model.memory import GIB

    cuda = next(model.parameters()).device.type == "cuda"
    step = step_shape(cfg, fast.fused_lora, _keeps_kv_heads(fast.attention, fast.packing, cuda),
                      fast.compile)
    shape = shape_of(model.config, sum(p.numel() for p in model.parameters()))
    return round(estimate(shape, tokens, labelled, fast.micro_batch, fast.checkpointing,
                          step).total / GIB, 2)


def apply(fast: FastPath, model: torch.nn.Module, peft_model: torch.nn.Module) -> Callable[[], None]:
    """Switch the levers on for training; returns the function that switches them back off.

    The base model is shared by a sweep's trials and by evaluation: everything done here to it
    (attention implementation, checkpointing, compiled layers) is undone by the returned call.
    """
    from loralab.model.attention import packed_attention_on
    from loralab.model.fast_lora import disable_fast_lora, enable_fast_lora

    undo: list[Callable[[], None]] = []
    if fast.fused_lora:
        enable_fast_lora(peft_model)
        undo.append(lambda: disable_fast_lora(peft_model))
    if fast.packing:
        ctx = packed_attention_on(model, fast.attention)
        ctx.__enter__()
        undo.append(lambda: ctx.__exit__(None, None, None))
    if fast.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        undo.append(model.gradient_checkpointing_disable)
    if fast.compile:
        undo.append(compile_layers(model))

    def restore() -> None:  # once: a later call (an error after the undo) does nothing
        for step in reversed(undo):
            step()
        undo.clear()

    return restore


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    return list(getattr(inner, "layers", []))


def compile_layers(model: torch.nn.Module, backend: Any = "inductor") -> Callable[[], None]:
    """torch.compile each decoder layer (one graph shared by all layers: regional compilation).

    Norms, RoPE, SiLU·mul and the LoRA casts/adds fuse into few kernels. The packed attention
    call is left out of the graph (torch.compiler.disable), so row lengths and boundaries do
    not cause recompiles. The token (and batch) dimensions are symbolic from the first step
    (dynamic=True): every step has another length, and dynamo's default (static first, dynamic
    after the first change) compiled every graph twice, ~22 s on a 0.5B model. The frozen
    weights and buffers are marked static, so hidden sizes stay constants in the kernels; only
    activations and the trainable LoRA factors are dynamic. The first layer's input is made to
    require grad as every other layer's does (`_first_input_needs_grad`), so all layers share
    one graph. Under a sweep's reuse settings
    (parameter shapes may be dynamic: sweep/compile_reuse.py) the LoRA ranks are symbolic from
    the start, so the trials of a sweep share one graph.
    """
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
    if not dynamo.config.force_parameter_static_shapes:
        mark_ranks_dynamic(model)
    layers = decoder_layers(model)
    for layer in layers:
        for tensor in [*layer.buffers(), *(p for p in layer.parameters() if not p.requires_grad)]:
            dynamo.mark_static(tensor)
        layer.compile(backend=backend, dynamic=True)
    embed = getattr(getattr(model, "model", model), "embed_tokens", None)
    hook = embed.register_forward_hook(_first_input_needs_grad) if embed is not None else None

    def uncompile() -> None:
        for layer in layers:
            layer._compiled_call_impl = None
        if hook is not None:
            hook.remove()

    return uncompile


def _first_input_needs_grad(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    """The frozen embedding's output made to require grad while training. Without it the first
    decoder layer's input is the only one that does not, a second variant of every compiled
    graph (dynamo guards on requires_grad): a second compilation of the layer at the first step
    (~40% of it on the CPU count). The price is one unused gradient of [tokens, hidden]."""
    if torch.is_grad_enabled() and not out.requires_grad and out.is_leaf:
        return out.detach().requires_grad_()
    return out
