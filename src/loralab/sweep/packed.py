"""A packed sweep: the trials train together, one forward/backward of the frozen base per step.

Each optimizer step, every active trial contributes its own step's sequences; one pass of the
base runs over all of them (`train/packed_step.py`), and each trial's own AdamW, schedule and
clipping update its own adapter (`model/packed_lora.py` keeps the trials' adapters apart).
A trial that reaches its last step is saved (a plain PEFT adapter) and leaves; one whose loss
is NaN/inf is recorded failed and the step is run again without it (its rows must not reach
the others' gradients); the others go on. Resume is per trial: finished trials are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

from loralab import rundir
from loralab.sweep import packed_trial
from loralab.sweep.mode import combined_config, micro_batches
from loralab.sweep.packed_trial import PackedTrial
from loralab.sweep.spec import Trial
from loralab.train.packed_step import PackedStats

Report = Callable[[str, str, dict[str, Any]], None]  # (trial name, status, fields)


def run_packed(trials: list[Trial], base: Any, report: Report, show_progress: bool = True,
               data: dict[str, tuple[list, dict]] | None = None) -> None:
    """Train `trials` together on `base` (loaded for the first; all share it), reporting each
    trial's status as it changes. The base is left as it was found. `data`: trial name →
    (examples, summary) already built (benchmarks), else each trial's data.path is read."""
    ready: list[PackedTrial] = []
    for slot, trial in enumerate(trials):
        report(trial.name, "running", {"worker": None, "packed": len(trials)})
        try:
            ready.append(packed_trial.prepare(trial, slot, base, (data or {}).get(trial.name)))
        except Exception as exc:  # bad data, bad targets...: this trial fails, others go on
            report(trial.name, "failed", {"error": f"{type(exc).__name__}: {exc}"})
    if not ready:
        return
    if any(pt.cfg.train.save_every for pt in ready):
        from rich.console import Console

        Console().print("[yellow]packed trials write no checkpoints (train.save_every): "
                        "--resume retrains an unfinished trial from its start[/yellow]")
    with contextlib.ExitStack() as held:
        for pt in ready:  # one writer per folder, as for a run trained alone
            held.enter_context(rundir.folder_lock(pt.run_dir))
        _train_together(ready, base, report, show_progress)


def plan_levers(ready: list[PackedTrial], base: Any) -> tuple[Any, int]:
    """The fast-path levers of the combined step and its number of micro-batches."""
    from loralab.train import levers
    from loralab.train.packed_step import planned_rows

    trials = [pt.trial for pt in ready]
    examples = [e for pt in ready for e in pt.examples]
    fast = levers.resolve(combined_config(trials), base.model, base.device, examples)
    parts = micro_batches(trials, fast if base.device.type == "cuda" else None)
    rows = sum(pt.cfg.train.batch_size * pt.cfg.train.grad_accum for pt in ready)
    # The packed layer is loralab's own fused LoRA forward: PEFT's layers are not in the model.
    fast = dataclasses.replace(fast, fused_lora=False, micro_batch=planned_rows(rows, parts),
                               grad_accum=parts)
    return fast, parts


def _train_together(ready: list[PackedTrial], base: Any, report: Report, show_progress: bool) -> None:
    from loralab.model.packed_lora import PackedAdapters
    from loralab.train import levers

    fast, parts = plan_levers(ready, base)
    params = list(base.model.parameters())
    flags = [p.requires_grad for p in params]
    base_params = sum(p.numel() for p in params)
    for p in params:
        p.requires_grad_(False)
    adapters = PackedAdapters(base.model, list(ready[0].cfg.lora.target_modules))
    undo: Callable[[], None] = lambda: None  # noqa: E731
    try:
        described = {**fast.describe(), "packed_trials": len(ready)}
        active = []
        for pt in ready:
            try:
                packed_trial.start(pt, adapters.add_trial(pt.slot, pt.spec(), pt.init),
                                   base_params, described)
                active.append(pt)
            except Exception as exc:
                adapters.drop_trial(pt.slot)
                report(pt.trial.name, "failed", {"error": f"{type(exc).__name__}: {exc}"})
        base.model.train()
        undo = levers.apply(fast, base.model, None)
        _loop(active, adapters, base, fast, parts, report, show_progress)
    finally:
        undo()
        adapters.uninstall()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        base.model.eval()


def _loop(active: list[PackedTrial], adapters: Any, base: Any, fast: Any, parts: int,
          report: Report, show_progress: bool) -> None:
    """Combined steps until every trial has finished or failed. An exception of one trial's
    own step fails that trial; one of the combined step (out of memory...) propagates with
    the trials unfinished (the runner trains them one by one); Ctrl-C marks them interrupted."""
    from loralab.train.progress import StepProgress

    bar = StepProgress(max((pt.total_steps for pt in active), default=0), 0,
                       enabled=show_progress, label="packed",
                       log_every=max(1, min(pt.cfg.train.log_every for pt in active) if active else 1))
    step = 0
    try:
        while active:
            t0 = time.perf_counter()
            stats = _combined_step(active, adapters, base, fast, parts)
            losses = {pt.slot: stats.loss_sum[pt.slot] / max(1, stats.tokens[pt.slot]) for pt in active}
            bad = [pt for pt in active if not math.isfinite(losses[pt.slot])]
            if bad:
                _drop_failed(active, bad, adapters, losses, report)
                continue  # the same step again without them
            if _isolate_overflows(active):
                continue  # the same step again, the overflowing trials each on its own
            seconds = time.perf_counter() - t0
            _update_each(active, adapters, report, losses, stats, seconds)
            _finish_done(active, adapters, base, report)
            step += 1
            bar.update(step, sum(losses.values()) / len(losses),
                       sum(stats.seen_tokens.values()) / max(seconds, 1e-9))
    except KeyboardInterrupt:
        for pt in active:  # what is running stops with it; --resume retrains it
            packed_trial.fail(pt, "KeyboardInterrupt: ", "interrupted")
        raise
    finally:
        bar.close()


def _combined_step(active: list[PackedTrial], adapters: Any, base: Any, fast: Any,
                   parts: int) -> PackedStats:
    """One step of every active trial: one pass for those computed together, one each for
    those computed alone (non-finite weights or gradient: they would reach every token of a
    shared pass through the GEMMs' 0·inf, and a run alone is what they must match)."""
    from loralab.train.packed_step import accumulate_packed_step

    together = [pt for pt in active if not pt.alone]
    total = PackedStats()
    try:
        for group in ([together] if together else []) + [[pt] for pt in active if pt.alone]:
            adapters.ctx.active = [pt.slot for pt in group]
            stats = accumulate_packed_step(
                adapters, base.model, {pt.slot: pt.step_examples() for pt in group}, parts,
                base.tokenizer.pad_token_id, base.device, packed=fast.packing,
                pad_multiple=fast.pad_multiple, chunk=active[0].cfg.train.loss_chunk,
            )
            total.loss_sum.update(stats.loss_sum)
            total.tokens.update(stats.tokens)
            total.seen_tokens.update(stats.seen_tokens)
            total.largest_batch = max(total.largest_batch, stats.largest_batch)
    finally:
        adapters.ctx.active = [pt.slot for pt in active]
    return total


def _isolate_overflows(active: list[PackedTrial]) -> bool:
    """True when a trial computed with others has a non-finite gradient: its gradient may
    have reached theirs (0·inf in the shared GEMMs), so every such trial is computed alone
    and the step is run again (each then gets the exact gradient of a run alone)."""
    from loralab.train.packed_step import all_finite

    together = [pt for pt in active if not pt.alone]
    if len(together) < 2:
        return False
    finite = all_finite([[p.grad for p in pt.params if p.grad is not None] for pt in together])
    overflowing = [pt for pt, ok in zip(together, finite, strict=True) if not ok]
    if not overflowing:
        return False
    for pt in active:
        pt.opt.optimizer.zero_grad(set_to_none=True)
    for pt in overflowing:
        pt.alone = True
    return True


def _update_each(active: list[PackedTrial], adapters: Any, report: Report,
                 losses: dict[int, float], stats: PackedStats, seconds: float) -> None:
    """Each trial's own clip/AdamW/schedule step; a trial whose step raises (an update that
    overflows float32...) fails with the error a run alone gives, the others go on."""
    from loralab.train.packed_step import all_finite

    norms = {}
    for pt in list(active):
        try:
            norms[pt.slot] = packed_trial.record_step(
                pt, losses[pt.slot], stats.tokens[pt.slot], stats.seen_tokens[pt.slot], seconds,
                stats.largest_batch)
        except Exception as exc:
            _drop(pt, active, adapters, report, f"{type(exc).__name__}: {exc}")
    # A trial whose weights or gradient are no longer finite is computed alone from now on.
    finite = all_finite([pt.params for pt in active])
    for pt, ok in zip(active, finite, strict=True):
        pt.alone = not (ok and math.isfinite(norms[pt.slot]))


def _drop(pt: PackedTrial, active: list[PackedTrial], adapters: Any, report: Report,
          error: str) -> None:
    """The trial fails (result.json, the sweep's report) and leaves the packed layers."""
    packed_trial.fail(pt, error)
    adapters.drop_trial(pt.slot)
    active.remove(pt)
    report(pt.trial.name, "failed", {"error": error})


def _drop_failed(active: list[PackedTrial], bad: list[PackedTrial], adapters: Any,
                 losses: dict[int, float], report: Report) -> None:
    for pt in active:
        pt.opt.optimizer.zero_grad(set_to_none=True)
    for pt in bad:
        # The words the loop uses when a trial trained alone meets a non-finite loss.
        _drop(pt, active, adapters, report,
              f"FloatingPointError: loss is {losses[pt.slot]} at step {pt.done.step + 1}: "
              "try a lower train.lr")


def _finish_done(active: list[PackedTrial], adapters: Any, base: Any, report: Report) -> None:
    for pt in [pt for pt in active if pt.done.step >= pt.total_steps]:
        weights = adapters.trial_weights(pt.slot)
        adapters.uninstall()  # PEFT attaches to the base's own Linear layers to save
        try:
            result = packed_trial.finish(pt, weights, base)
        except Exception as exc:  # a full disk...: this trial fails, the others go on
            adapters.install()
            _drop(pt, active, adapters, report, f"{type(exc).__name__}: {exc}")
            continue
        adapters.install()
        adapters.drop_trial(pt.slot)
        active.remove(pt)
        from loralab.sweep.manifest import result_summary

        report(pt.trial.name, "done", {"result": result_summary(result), "error": None})
