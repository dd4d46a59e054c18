"""The training loop, in litgpt's shape: `train_adapter` checks the folder and attaches the
adapter, `setup` gathers what a run trains with into one `Run`, `fit` trains it step by step,
`finish` saves the adapter and result.json. Only a job's main process writes the run folder.

Data flow: records → Examples (tokens + labels) → per-step plan of micro-batches → LabelledLoss
(logits only where labels are) → token-normalised accumulation → AdamW on the LoRA weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
from loralab.train import levers
from loralab.train.dist import Dist, from_env
from loralab.train.eval_loss import held_out_examples, held_out_loss
from loralab.train.progress import StepProgress, print_split
from loralab.train.results import final_numbers, peak_memory_gb, run_identity
from loralab.train.run_state import Progress, restore_progress, save_progress
from loralab.train.schedule import Optim, StepPlan, make_optimizer
from loralab.train.step import accumulate_step, clip_gradients
from loralab.train.tracking import Tracker, start_tracker, tracker_metrics


@dataclass
class Base:
    """A loaded base model and tokenizer, shared by the trials of a sweep."""

    model: Any
    tokenizer: Any
    device: torch.device


@dataclass(frozen=True)
class Job:
    """What was asked of this process: the config, and how to treat the folder and terminal."""

    cfg: Config
    dist: Dist
    resume: bool = False
    overwrite: bool = False
    show_progress: bool = True


@dataclass
class Run:
    """One run's state: everything `fit` reads and advances."""

    cfg: Config
    dist: Dist  # this process's place in the job
    folder: layout.RunDir  # written by the main process only
    base: Base
    model: Any  # the PeftModel being trained
    loss: Any  # LabelledLoss: logits only where labels are
    opt: Optim  # AdamW, its LR schedule, the step counts
    fast: levers.FastPath  # the levers as resolved for this device and data
    examples: list
    steps: StepPlan  # which examples each step trains on
    held_out: list  # the eval file's examples when train.eval_every asks for a held-out loss
    progress: Progress  # what is done: saved in checkpoints, restored by --resume
    tracker: Tracker | None  # main process only
    bar: StepProgress
    result: dict[str, Any]  # result.json so far


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
    from loralab.data.summary import build_dataset, print_summary
    from loralab.model.lora import attach_lora

    job = Job(cfg, dist or from_env(), resume, overwrite, show_progress)
    with contextlib.ExitStack() as held:  # one writer per folder: the lock is held to the end
        job.dist.main_decides(lambda: _check_folder(job, held))
        started = time.time()
        examples, summary = data or build_dataset(cfg.data, base.tokenizer, cfg.train.seed)
        if job.dist.is_main and show_progress:
            print_summary(summary)
        peft_model = attach_lora(base.model, cfg.lora, cfg.train.seed)  # checks target modules
        sharding = _shard(base, peft_model, job.dist) if _fsdp(cfg, job.dist) else None
        try:
            if job.dist.is_main:
                _prepare_folder(job, summary)
            run = setup(job, base, peft_model, (examples, summary), sharding)
            result = fit_and_save(run, started)
        except BaseException:
            peft_model.unload()
            raise
    return peft_model, result


def _check_folder(job: Job, held: contextlib.ExitStack) -> None:
    folder = layout.RunDir(job.cfg.output_dir)
    held.enter_context(rundir.folder_lock(folder.path))
    ckpt.check_run_dir(folder.path, job.resume, job.overwrite)
    if job.resume:
        ckpt.check_resume_config(folder.path, job.cfg.to_dict())
        done = folder.read_result()
        if done.get("status") == "done":
            raise UserError(f"{folder.path} finished ({done.get('steps')} steps): nothing to "
                            "resume; --overwrite trains it again")


def _prepare_folder(job: Job, summary: dict) -> None:
    folder = layout.RunDir(job.cfg.output_dir)
    if job.overwrite:
        ckpt.clear_run_dir(folder.path)
    folder.path.mkdir(parents=True, exist_ok=True)
    rundir.claim(folder.path, "run")  # loralab's marker; temp files of a killed write go
    if not job.resume:
        save_config(job.cfg, folder.config)
        folder.step_metrics.unlink(missing_ok=True)
    write_json(folder.data_summary, summary)


def setup(job: Job, base: Base, peft_model: Any, data: tuple[list, dict],
          sharding: dict[str, Any] | None) -> Run:
    """The run's state: levers resolved, optimizer built, progress restored (--resume),
    result.json saying `running` (main process)."""
    from loralab.model.lora import LabelledLoss, count_parameters

    cfg, dist, (examples, summary) = job.cfg, job.dist, data
    folder = layout.RunDir(cfg.output_dir)
    # Dropout masks differ between processes, as they would between a step's micro-batches.
    torch.manual_seed(cfg.train.seed + dist.rank)
    fast = _resolve_levers(job, base, examples, sharding)
    peft_model.train()
    loss = LabelledLoss(peft_model, cfg.train.loss_chunk, fast.labelled_only)
    opt = make_optimizer(cfg, peft_model, len(examples))
    dist.same_start(opt.params)
    progress = restore_progress(folder.path, job.resume, peft_model, opt, dist,
                                cfg.train.early_stopping_patience)
    schedule = opt.schedule
    result = {
        **run_identity(cfg, summary, schedule.total_steps, schedule.steps_per_epoch,
                       *count_parameters(peft_model)),
        "fast_path": fast.describe(),
        **({"fsdp": sharding} if sharding else {}),
    }
    main = dist.is_main
    if main:
        ckpt.write_result(folder.path, {**result, "status": "running"})
    return Run(
        cfg=cfg, dist=dist, folder=folder, base=base, model=peft_model, loss=loss, opt=opt,
        fast=fast, examples=examples,
        steps=StepPlan.for_run(cfg, [len(e.input_ids) for e in examples], fast.micro_batch,
                               fast.grad_accum),
        held_out=held_out_examples(cfg, base.tokenizer),
        progress=progress,
        tracker=start_tracker(cfg.tracking, folder.path, cfg.to_dict()) if main else None,
        bar=StepProgress(schedule.total_steps, progress.step, enabled=job.show_progress and main,
                         log_every=cfg.train.log_every),
        result=result,
    )


def _resolve_levers(job: Job, base: Base, examples: list,
                    sharding: dict[str, Any] | None) -> levers.FastPath:
    cfg, dist = job.cfg, job.dist
    # The main process's plan for all: free memory differs a little between cards, and two
    # processes planning different micro-batches would wait on each other forever.
    fast = dist.share(levers.resolve(cfg, base.model, base.device, examples, dist.world))
    if sharding:  # not yet measured with sharded layers: the plain PEFT forward, eager
        fast = dataclasses.replace(fast, compile=False, fused_lora=False)
    if dist.world > 1 and dist.is_main and job.show_progress:
        print_split(cfg.train.batch_size * cfg.train.grad_accum, fast.micro_batch, dist.world)
    return fast


def fit_and_save(run: Run, started: float) -> dict[str, Any]:
    """`fit` with the levers on, then the adapter and result.json. A failure (or Ctrl-C),
    the final save's included, is written into result.json before it propagates."""
    undo_levers = levers.apply(run.fast, run.base.model, run.model)
    try:
        fit(run)
        undo_levers()  # the base and the adapter layers go back to plain HF + PEFT
        run.bar.close()
        finish(run, started)
    except BaseException as exc:
        undo_levers()
        run.bar.close()
        _record_failure(run, exc)
        raise
    if run.tracker is not None:
        run.tracker.finish()
        run.result["tracker"] = {"backend": run.tracker.name, "log_dir": run.tracker.where}
    return {**run.result, "status": "done"}


def fit(run: Run) -> None:
    """Train from the run's progress to the end of its schedule, or until early stopping."""
    train, total = run.cfg.train, run.opt.schedule.total_steps
    for step in range(run.progress.step + 1, total + 1):  # 1-based: the step numbers shown
        row = train_step(run, step)
        stop = False
        if run.held_out and step % train.eval_every == 0:
            row["eval_loss"] = _held_out_loss(run)
            stop = run.progress.best.update(row["eval_loss"], step, run.model)
        _log(run, row, last=stop or step == total)
        if train.save_every and step % train.save_every == 0 and step < total:
            save_progress(run.folder.path, run.model, run.opt, run.progress, run.dist,
                          train.keep_checkpoints)
        if stop:
            break


def train_step(run: Run, step: int) -> dict[str, Any]:
    """Optimizer step `step`: its micro-batches accumulated, the gradients summed over the
    processes and clipped, AdamW and the schedule advanced; returns its metrics row."""
    opt, fast = run.opt, run.fast
    micro_batches = run.steps.step(step - 1)
    t0 = time.perf_counter()
    stats = accumulate_step(
        run.dist, run.loss, run.examples, micro_batches, run.base.tokenizer.pad_token_id,
        packed=fast.packing, pad_multiple=fast.pad_multiple,
        lockstep=run.cfg.train.strategy == "fsdp",
    )
    run.dist.sum_gradients(opt.params)
    grad_norm = clip_gradients(opt.params, run.cfg.train.max_grad_norm)
    lr = opt.scheduler.get_last_lr()[0]
    opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    loss = stats.loss_sum / max(1, stats.tokens)
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}: try a lower train.lr")
    run.progress.add_step(step, loss, stats, seconds)
    return {
        "step": step,
        "epoch": round(step / opt.schedule.steps_per_epoch, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": stats.seen_tokens / seconds,
        "step_seconds": round(seconds, 4),
        "labelled_tokens": stats.tokens,
        "memory_gb": run.dist.max(peak_memory_gb()),
    }


def _held_out_loss(run: Run) -> float:
    # Every process evaluates all of it (the same passes: FSDP's layers are collectives) and
    # the main's figure decides for all, to the last bit.
    fast = run.fast
    return run.dist.share(held_out_loss(
        run.loss, run.model, run.held_out, fast.micro_batch, run.base.tokenizer.pad_token_id,
        run.base.device, fast.packing, fast.pad_multiple,
    ))


def _log(run: Run, row: dict[str, Any], last: bool) -> None:
    """metrics.jsonl and the tracker every train.log_every steps and at the last one (main
    process); the progress bar or line."""
    step = row["step"]
    if run.tracker is not None and (step % run.cfg.train.log_every == 0 or last):
        append_jsonl(run.folder.step_metrics, row)
        run.tracker.log(tracker_metrics(row), step)
    run.bar.update(step, row["loss"], row["tokens_per_s"], row.get("eval_loss"))


def finish(run: Run, started: float) -> None:
    """The run's figures into run.result, the adapter saved (the best eval's weights when
    early stopping chose them) and result.json written `done` (main process)."""
    progress, result = run.progress, run.result
    run.model.eval()
    result.update(final_numbers(progress.losses, progress.tokens, progress.train_seconds, started))
    result.update(progress.best.finish(run.model, progress.step, run.opt.schedule.total_steps))
    result["peak_memory_gb"] = round(run.dist.max(result["peak_memory_gb"]), 3)
    result["processes"] = run.dist.world
    if not run.dist.is_main:
        return
    ckpt.save_adapter_files(run.model, run.base.tokenizer, run.folder.path)
    if run.base.device.type == "cuda" and progress.largest[0]:
        # Predicted for the largest micro-batch this process actually had, to set against
        # peak_memory_gb (the fast_path's own figure is planned for every process's steps).
        result["predicted_peak_gb"] = levers.predict_peak_gib(run.cfg, run.base.model, run.fast,
                                                              *progress.largest)
    ckpt.write_result(run.folder.path, {**result, "status": "done"})


def _record_failure(run: Run, exc: BaseException) -> None:
    if not run.dist.is_main:
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    error = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError):  # a full disk must not hide the real error
        ckpt.write_result(run.folder.path, {**run.result, "status": status, "error": error,
                                            "steps": run.progress.step})
    if run.tracker is not None:
        run.tracker.finish()


def _fsdp(cfg: Config, dist: Dist) -> bool:
    return cfg.train.strategy == "fsdp" and dist.world > 1


def _shard(base: Base, peft_model: Any, dist: Dist) -> dict[str, Any]:
    """train.strategy=fsdp: the decoder layers sharded, then everything moved to this GPU."""
    from loralab.train import fsdp

    layers = fsdp.shard_decoder_layers(base.model, dist)
    fsdp.move_to(peft_model, dist.device)
    base.device = dist.device
    return fsdp.describe(base.model, layers, dist)


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
