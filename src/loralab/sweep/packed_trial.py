"""One trial of a packed sweep: its data, initial adapter, optimizer, progress and run folder.

A packed trial's run folder holds what a sequential trial's does (config.yaml,
data_summary.json, metrics.jsonl, result.json, the PEFT adapter and tokenizer), written by the
same train/ functions; only checkpoints/ is missing (packed resume is per trial).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralab import layout, rundir
from loralab.config import save_config
from loralab.io import append_jsonl, write_json
from loralab.model.packed_lora import TrialSpec, load_into_peft, peft_weights
from loralab.sweep.spec import Trial
from loralab.train import checkpoint as ckpt
from loralab.train.results import final_numbers, peak_memory_gb, run_identity
from loralab.train.run_state import Progress
from loralab.train.schedule import Optim, make_optimizer


class _Params:
    """What make_optimizer needs of a model: the trial's parameters, in PEFT's order."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.params


@dataclass
class PackedTrial:
    """A trial training inside a packed sweep."""

    trial: Trial
    slot: int
    examples: list
    summary: dict[str, Any]
    init: dict[str, tuple[torch.Tensor, torch.Tensor]]
    started: float = field(default_factory=time.time)
    params: list = field(default_factory=list)
    opt: Optim | None = None
    done: Progress = field(default_factory=Progress)
    rows: list[dict[str, Any]] = field(default_factory=list)  # for the tracker, at the end
    result: dict[str, Any] = field(default_factory=dict)
    alone: bool = False  # computed in a pass of its own (its weights or gradient not finite)

    @property
    def cfg(self) -> Any:
        return self.trial.config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def total_steps(self) -> int:
        return self.opt.schedule.total_steps

    def spec(self) -> TrialSpec:
        lora = self.cfg.lora
        scale = lora.alpha / (math.sqrt(lora.r) if lora.rslora else lora.r)
        return TrialSpec(lora.r, scale, lora.dropout)

    def step_examples(self) -> list:
        """This trial's next optimizer step: the examples its own plan puts there."""
        from loralab.data.batching import plan_steps

        t = self.cfg.train
        epoch, index = divmod(self.done.step, self.opt.schedule.steps_per_epoch)
        lengths = [len(e.input_ids) for e in self.examples]
        plan = _plan(tuple(lengths), t.batch_size * t.grad_accum, t.seed, epoch,
                     self.cfg.data.shuffle, t.group_by_length, plan_steps)
        return [self.examples[i] for i in plan[index][0]]


_PLANS: dict[tuple, list] = {}


def _plan(lengths: tuple[int, ...], per_step: int, seed: int, epoch: int, shuffle: bool,
          by_length: bool, plan_steps: Any) -> list:
    # One micro-batch of the whole step: the step's set (and its order when sorted by length)
    # depends only on seed, epoch and the effective batch, as in the loop's plan.
    key = (lengths, per_step, seed, epoch, shuffle, by_length)
    if key not in _PLANS:
        if len(_PLANS) > 64:
            _PLANS.clear()
        _PLANS[key] = plan_steps(list(lengths), per_step, 1, seed, epoch, shuffle, by_length)
    return _PLANS[key]


def prepare(trial: Trial, slot: int, base: Any, data: tuple[list, dict] | None = None) -> PackedTrial:
    """Data and the initial adapter weights, exactly as `train_run` would make them: the
    adapter is attached with PEFT (same seed → same init), read, and detached again."""
    from loralab.data.summary import build_dataset
    from loralab.model.lora import attach_lora

    cfg = trial.config
    examples, summary = data or build_dataset(cfg.data, base.tokenizer, cfg.train.seed)
    peft_model = attach_lora(base.model, cfg.lora, cfg.train.seed)
    try:
        init = peft_weights(peft_model)
    finally:
        peft_model.unload()
    return PackedTrial(trial, slot, examples, summary, init)


def start(pt: PackedTrial, params: list, base_params: int, fast: dict[str, Any]) -> None:
    """Optimizer, schedule and a fresh run folder (config, data summary, result 'running')."""
    cfg = pt.cfg
    pt.params = params
    pt.opt = make_optimizer(cfg, _Params(params), len(pt.examples))
    ckpt.clear_run_dir(pt.run_dir)  # the sweep owns its trial folders: an unfinished one restarts
    rundir.claim(pt.run_dir, "run")
    save_config(cfg, pt.run_dir / layout.CONFIG)
    (pt.run_dir / layout.STEP_METRICS).unlink(missing_ok=True)
    write_json(pt.run_dir / layout.DATA_SUMMARY, pt.summary)
    trainable = sum(p.numel() for p in params)
    pt.result = {
        **run_identity(cfg, pt.summary, pt.total_steps, pt.opt.schedule.steps_per_epoch,
                       trainable, base_params + trainable),
        "fast_path": fast,
    }
    ckpt.write_result(pt.run_dir, {**pt.result, "status": "running"})


def record_step(pt: PackedTrial, loss: float, tokens: int, seen: int, seconds: float,
                largest: tuple[int, int]) -> float:
    """Clip, update, schedule: the alone loop's step, on this trial's own optimizer; returns
    the gradient norm (before clipping). A non-finite gradient is applied as alone (clipping
    makes it NaN): the trial then fails at its next step's loss, as a run alone does."""
    from loralab.train.step import clip_gradients

    opt = pt.opt
    grad_norm = clip_gradients(opt.params, pt.cfg.train.max_grad_norm)
    lr = opt.scheduler.get_last_lr()[0]
    opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    done = pt.done
    done.step += 1
    done.losses.append(loss)
    done.tokens += seen
    done.train_seconds += seconds
    done.largest = max(done.largest, largest)
    row = {
        "step": done.step,
        "epoch": round(done.step / opt.schedule.steps_per_epoch, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": seen / seconds if seconds else 0.0,
        "labelled_tokens": tokens,
        "memory_gb": peak_memory_gb(),
    }
    last = done.step == pt.total_steps
    if done.step % pt.cfg.train.log_every == 0 or last:
        append_jsonl(pt.run_dir / layout.STEP_METRICS, row)
        pt.rows.append(row)
    return grad_norm


def finish(pt: PackedTrial, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], base: Any) -> dict:
    """Save the trained adapter as a plain PEFT folder (attached with PEFT, filled, saved,
    detached: the same files a sequential trial writes) and result.json 'done'."""
    from loralab.model.lora import attach_lora

    # eval() for the save reaches the shared base's modules: their modes are put back after,
    # else the trials still training lose gradient checkpointing and dropout (transformers
    # checkpoints only when `self.training`).
    modes = {module: module.training for module in base.model.modules()}
    peft_model = attach_lora(base.model, pt.cfg.lora, pt.cfg.train.seed)
    try:
        load_into_peft(peft_model, weights)
        peft_model.eval()
        ckpt.save_adapter_files(peft_model, base.tokenizer, pt.run_dir)
    finally:
        peft_model.unload()
        for module, training in modes.items():
            module.training = training
    result = {**pt.result,
              **final_numbers(pt.done.losses, pt.done.tokens, pt.done.train_seconds, pt.started),
              "processes": 1}
    ckpt.write_result(pt.run_dir, {**result, "status": "done"})
    _send_to_tracker(pt)
    return {**result, "status": "done"}


def fail(pt: PackedTrial, error: str, status: str = "failed") -> None:
    """result.json 'failed' (or 'interrupted') with what the alone run would have said."""
    with contextlib.suppress(OSError):  # a full disk must not hide the real error
        ckpt.write_result(pt.run_dir, {**pt.result, "status": status, "error": error,
                                       "steps": pt.done.step})
    _send_to_tracker(pt)


def _send_to_tracker(pt: PackedTrial) -> None:
    # Trackers (SwanLab) hold one run per process: a packed trial's metrics are sent when it
    # ends, to a run of its own in the sweep's group, with the steps they were logged at.
    from loralab.train.tracking import start_tracker

    tracker = start_tracker(pt.cfg.tracking, pt.run_dir, pt.cfg.to_dict())
    try:
        for row in pt.rows:
            metrics = {f"train/{k}": v for k, v in row.items() if k != "step"}
            tracker.log(metrics, row["step"])
    finally:
        tracker.finish()
