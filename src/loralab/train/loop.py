"""The training loop: one readable function from a Config to a run directory.

Data flow: records → Examples (tokens + labels) → per-step plan of micro-batches → LabelledLoss
(logits only where labels are) → token-normalised accumulation → AdamW on the LoRA weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralab import layout, rundir
from loralab.config import Config, save_config
from loralab.errors import UserError
from loralab.io import append_jsonl, write_json
from loralab.train import checkpoint as ckpt
from loralab.train.dist import Dist, from_env
from loralab.train.eval_loss import held_out_loss
from loralab.train.progress import StepProgress
from loralab.train.results import final_numbers, peak_memory_gb, run_identity
from loralab.train.run_state import Progress, restore_progress, save_progress
from loralab.train.schedule import Optim, make_optimizer
from loralab.train.step import accumulate_step, clip_gradients
from loralab.train.tracking import start_tracker


@dataclass
class Base:
    """A loaded base model and tokenizer, shared by the trials of a sweep."""

    model: Any
    tokenizer: Any
    device: torch.device


def train_run(
    cfg: Config,
    *,
    base: Base | None = None,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train one adapter as `cfg` says; returns result.json's content. The base is left clean.

    Without a `base`, the run directory and the data are checked before any weights are loaded:
    a typo in a data file should cost seconds, not a 15 GB model load.
    """
    data = None
    dist = from_env()
    if base is None:
        from loralab.data.summary import build_dataset
        from loralab.model.load import resolve_model_path, resolve_tokenizer_path
        from loralab.model.tokenizer import load_tokenizer

        def check_and_fetch() -> None:  # the main process downloads or builds, the others reuse
            ckpt.check_run_dir(Path(cfg.output_dir), resume, overwrite)
            resolve_tokenizer_path(cfg.model)
            resolve_model_path(cfg.model)

        dist.main_decides(check_and_fetch)
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.model))
        data = build_dataset(cfg.data, tokenizer, cfg.train.seed)
        # FSDP loads on the CPU (a base may not fit one GPU), shards, then moves the shards.
        stage = torch.device("cpu") if _fsdp(cfg, dist) else None
        base = load_base(cfg, dist.device, stage=stage)
    peft_model, result = train_adapter(
        cfg, base, data=data, resume=resume, overwrite=overwrite, show_progress=show_progress,
        dist=dist,
    )
    if "fsdp" not in result:  # a sharded base is not handed back to anyone
        peft_model.unload()
    return result


def _fsdp(cfg: Config, dist: Dist) -> bool:
    return cfg.train.strategy == "fsdp" and dist.world > 1


def train_adapter(
    cfg: Config,
    base: Base,
    *,
    data: tuple[list, dict] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    dist: Dist | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Attach a fresh adapter to `base` and train it; the caller owns (and unloads) the PeftModel.

    `data` is (examples, summary) when already built. Everything that can be wrong with the
    input is checked before the run directory is touched, and only the main process of a
    multi-process job checks, writes or removes anything in it.
    """
    dist = dist or from_env()
    run_dir = Path(cfg.output_dir)
    with contextlib.ExitStack() as held:

        def check() -> None:  # one writer per folder: the lock is held until the run ends
            held.enter_context(rundir.folder_lock(run_dir))
            ckpt.check_run_dir(run_dir, resume, overwrite)
            if resume:
                ckpt.check_resume_config(run_dir, cfg.to_dict())
                _refuse_finished(run_dir)

        dist.main_decides(check)
        return _attach_and_train(cfg, base, data, resume, overwrite, show_progress, dist)


def _refuse_finished(run_dir: Path) -> None:
    done = layout.RunDir(run_dir).read_result()
    if done.get("status") == "done":
        raise UserError(f"{run_dir} finished ({done.get('steps')} steps): nothing to resume; "
                        "--overwrite trains it again")


def _attach_and_train(cfg, base, data, resume, overwrite, show_progress, dist):
    from loralab.data.summary import build_dataset, print_summary
    from loralab.model.lora import attach_lora

    run_dir = Path(cfg.output_dir)
    started = time.time()
    examples, summary = data or build_dataset(cfg.data, base.tokenizer, cfg.train.seed)
    if dist.is_main and show_progress:
        print_summary(summary)
    peft_model = attach_lora(base.model, cfg.lora, cfg.train.seed)  # checks target modules
    sharding = _shard(base, peft_model, dist) if _fsdp(cfg, dist) else None
    try:
        if dist.is_main:
            _prepare_dir(run_dir, cfg, summary, resume, overwrite)
        result = _train(cfg, dist, base, peft_model, examples, summary, resume, started,
                        show_progress, sharding)
    except BaseException:
        peft_model.unload()
        raise
    return peft_model, result


def load_base(
    cfg: Config, device: torch.device | None = None, stage: torch.device | None = None
) -> Base:
    """The config's base model for `device` (default: cuda:current, else cpu), in the dtype
    chosen for `device`; loaded on `stage` instead when given (FSDP moves it after sharding)."""
    from loralab.model.load import load_base_model, pick_dtype

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    precision = None if cfg.train.precision == "auto" else cfg.train.precision
    dtype = pick_dtype(precision or cfg.model.dtype, device)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    model, tokenizer = load_base_model(cfg.model, stage or device, name)
    return Base(model, tokenizer, stage or device)


def _prepare_dir(run_dir: Path, cfg: Config, summary: dict, resume: bool, overwrite: bool) -> None:
    if overwrite:
        ckpt.clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.claim(run_dir, "run")  # loralab's marker; temp files of a killed write go
    if not resume:
        save_config(cfg, run_dir / layout.CONFIG)
        (run_dir / layout.STEP_METRICS).unlink(missing_ok=True)
    write_json(run_dir / layout.DATA_SUMMARY, summary)


def _shard(base: Base, peft_model: Any, dist: Dist) -> dict[str, Any]:
    """train.strategy=fsdp: the decoder layers sharded, then everything moved to this GPU."""
    from loralab.train import fsdp

    layers = fsdp.shard_decoder_layers(base.model, dist)
    fsdp.move_to(peft_model, dist.device)
    base.device = dist.device
    return fsdp.describe(base.model, layers, dist)


def _train(
    cfg, dist: Dist, base, peft_model, examples, summary, resume, started, show_progress,
    sharding: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from loralab.model.lora import LabelledLoss, count_parameters
    from loralab.train import levers

    run_dir = Path(cfg.output_dir)
    # Dropout masks differ between processes, as they would between a step's micro-batches.
    torch.manual_seed(cfg.train.seed + dist.rank)
    # The main process's plan for all: free memory differs a little between cards, and two
    # processes planning different micro-batches would wait on each other forever.
    fast = dist.share(levers.resolve(cfg, base.model, base.device, examples, dist.world))
    if sharding:  # not yet measured with sharded layers: the plain PEFT forward, eager
        fast = dataclasses.replace(fast, compile=False, fused_lora=False)
    if dist.world > 1 and dist.is_main and show_progress:
        _print_split(cfg, fast, dist.world)
    peft_model.train()
    loss_module = LabelledLoss(peft_model, cfg.train.loss_chunk, fast.labelled_only)
    opt = make_optimizer(cfg, peft_model, len(examples))
    dist.same_start(opt.params)
    done = restore_progress(run_dir, resume, peft_model, opt, dist, cfg.train.early_stopping_patience)
    result = {
        **run_identity(
            cfg,
            summary,
            opt.schedule.total_steps,
            opt.schedule.steps_per_epoch,
            *count_parameters(peft_model),
        ),
        "fast_path": fast.describe(),
        **({"fsdp": sharding} if sharding else {}),
    }
    main = dist.is_main
    if main:
        ckpt.write_result(run_dir, {**result, "status": "running"})
    tracker = start_tracker(cfg.tracking, run_dir, cfg.to_dict()) if main else None
    held_out = _held_out_examples(cfg, base.tokenizer)
    bar = StepProgress(opt.schedule.total_steps, done.step, enabled=show_progress and main,
                       log_every=cfg.train.log_every)
    undo_levers = levers.apply(fast, base.model, peft_model)
    try:
        for step in range(done.step, opt.schedule.total_steps):
            row = _train_step(cfg, dist, loss_module, opt, examples, step, fast, base, done)
            stop = False
            if held_out and (step + 1) % cfg.train.eval_every == 0:
                # Every process evaluates all of it (the same passes: FSDP's layers are
                # collectives) and the main's figure decides for all, to the last bit.
                row["eval_loss"] = dist.share(held_out_loss(
                    loss_module, peft_model, held_out, fast.micro_batch,
                    base.tokenizer.pad_token_id, base.device, fast.packing, fast.pad_multiple,
                ))
                stop = done.best.update(row["eval_loss"], step + 1, peft_model)
            last = stop or step + 1 == opt.schedule.total_steps
            if main and ((step + 1) % cfg.train.log_every == 0 or last):
                append_jsonl(run_dir / layout.STEP_METRICS, row)
                tracker.log(_tracker_metrics(row), step + 1)
            bar.update(step + 1, row["loss"], row["tokens_per_s"], row.get("eval_loss"))
            every = cfg.train.save_every
            if every and (step + 1) % every == 0 and step + 1 < opt.schedule.total_steps:
                save_progress(run_dir, peft_model, opt, done, dist, cfg.train.keep_checkpoints)
            _test_kill_hook(step + 1)
            if stop:
                break
        undo_levers()  # the base and the adapter layers go back to plain HF + PEFT
        bar.close()
        peft_model.eval()
        result.update(final_numbers(done.losses, done.tokens, done.train_seconds, started))
        result.update(_early_stop_numbers(done, peft_model, opt.schedule.total_steps))
        result["peak_memory_gb"] = round(dist.max(result["peak_memory_gb"]), 3)
        result["processes"] = dist.world
        if main:
            ckpt.save_adapter_files(peft_model, base.tokenizer, run_dir)
            if base.device.type == "cuda" and done.largest[0]:
                # Predicted for the largest micro-batch this run actually had, to set against
                # peak_memory_gb (the fast_path's own figure is the plan's worst case).
                result["predicted_peak_gb"] = levers.predict_peak_gib(
                    cfg, base.model, fast, *done.largest
                )
            ckpt.write_result(run_dir, {**result, "status": "done"})
    except BaseException as exc:
        undo_levers()
        bar.close()
        if main:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):  # a full disk must not hide the real error
                ckpt.write_result(
                    run_dir, {**result, "status": status, "error": error, "steps": done.step}
                )
            tracker.finish()
        raise
    if main:
        tracker.finish()
        result["tracker"] = {"backend": tracker.name, "log_dir": tracker.where}
    return {**result, "status": "done"}


def _train_step(
    cfg, dist: Dist, loss_module, opt: Optim, examples, step: int, fast, base, done: Progress
) -> dict[str, Any]:
    """One optimizer step: plan, accumulate, clip, update; returns its metrics row."""
    schedule = opt.schedule
    epoch, index = divmod(step, schedule.steps_per_epoch)
    lengths = tuple(len(e.input_ids) for e in examples)
    plan = _epoch_plan(
        lengths,
        fast.micro_batch,
        fast.grad_accum,
        cfg.train.seed,
        epoch,
        cfg.data.shuffle,
        cfg.train.group_by_length,
    )
    t0 = time.perf_counter()
    stats = accumulate_step(
        dist,
        loss_module,
        examples,
        plan[index],
        base.tokenizer.pad_token_id,
        packed=fast.packing,
        pad_multiple=fast.pad_multiple,
        lockstep=cfg.train.strategy == "fsdp",
    )
    dist.sum_gradients(opt.params)
    grad_norm = clip_gradients(opt.params, cfg.train.max_grad_norm)
    lr = opt.scheduler.get_last_lr()[0]
    opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    loss = stats.loss_sum / max(1, stats.tokens)
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step + 1}: try a lower train.lr")
    done.step = step + 1
    done.losses.append(loss)
    done.tokens += stats.seen_tokens
    done.train_seconds += seconds
    done.largest = max(done.largest, stats.largest_batch)
    return {
        "step": step + 1,
        "epoch": round((step + 1) / schedule.steps_per_epoch, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": stats.seen_tokens / seconds,
        "labelled_tokens": stats.tokens,
        "memory_gb": dist.max(peak_memory_gb()),
    }


@functools.lru_cache(maxsize=2)
def _epoch_plan(
    lengths: tuple[int, ...],
    micro: int,
    accum: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    group_by_length: bool,
) -> list:
    """An epoch's plan is a pure function of these: recomputing it on resume is free."""
    from loralab.data.batching import plan_steps

    return plan_steps(list(lengths), micro, accum, seed, epoch, shuffle, group_by_length)


def _tracker_metrics(row: dict[str, Any]) -> dict[str, float]:
    out = {f"train/{k}": v for k, v in row.items() if k not in ("step", "eval_loss")}
    if "eval_loss" in row:
        out["eval/loss"] = row["eval_loss"]
    return out


def _held_out_examples(cfg: Config, tokenizer: Any) -> list:
    """The eval file's examples when train.eval_every asks for a held-out loss."""
    if not cfg.train.eval_every or not cfg.data.eval_path:
        return []
    from loralab.data.summary import build_dataset

    examples, _ = build_dataset(
        cfg.data, tokenizer, cfg.train.seed, path=cfg.data.eval_path, select=False
    )
    return examples


def _early_stop_numbers(done: Progress, peft_model: Any, total_steps: int) -> dict[str, Any]:
    """The held-out figures for result.json; with early stopping, the best eval's weights
    become the adapter that is saved."""
    out = done.best.describe()
    if done.best.patience:
        out["stopped_early"] = done.step < total_steps
        if done.best.restore_best(peft_model):
            out["adapter"] = f"best held-out loss, step {done.best.step}"
    return out


def _print_split(cfg: Config, fast: Any, world: int) -> None:
    from rich.console import Console

    per_step = cfg.train.batch_size * cfg.train.grad_accum
    per_process = -(-per_step // world)
    Console().print(
        f"{world} processes: each optimizer step's {per_step} sequences are shared, "
        f"~{per_process} per process (micro-batches of up to {fast.micro_batch}); "
        "gradients summed over processes, so the step equals one process's"
    )


def _test_kill_hook(step: int) -> None:
    # Lets the resume test kill a real run at a chosen step (SIGKILL: no cleanup of any kind).
    if os.environ.get("LORALAB_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
