"""Run a sweep's trials: one process and one loaded base model, or one worker process per GPU.

In-process (CPU, one GPU, parallel=1): trials that share a base (same model.* and precision) run
one after another on a single loaded copy. Parallel: spawned workers each load their own base,
pull trials from a queue and report back; only the parent writes sweep.json.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import signal
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from loralab.sweep.compile_reuse import compiled_code_reused
from loralab.sweep.manifest import (
    counts,
    mark,
    result_summary,
    save_manifest,
    start_manifest,
    trial_entry,
)
from loralab.sweep.spec import SweepSpec, Trial, base_key

console = Console()
INTERRUPTED = "interrupted (Ctrl-C); loralab sweep --resume reruns it"


def run_sweep(
    spec: SweepSpec, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Train every unfinished trial; returns the final manifest (also in SWEEP_DIR/sweep.json)."""
    from loralab import rundir

    with rundir.folder_lock(spec.output_dir):  # one sweep per folder at a time
        manifest = start_manifest(spec, resume, overwrite)
        rundir.claim(spec.output_dir, "sweep")
        save_manifest(spec.output_dir, manifest)
        _run_trials(spec, manifest, show_progress)
    return manifest


def _run_trials(spec: SweepSpec, manifest: dict[str, Any], show_progress: bool) -> None:
    todo = group_by_base([t for t in spec.trials if trial_entry(manifest, t.name)["status"] != "done"])
    skipped = len(spec.trials) - len(todo)
    workers = worker_count(spec.parallel, len(todo))
    console.print(
        f"sweep {spec.name}: {len(todo)} trial(s) to run"
        + (f", {skipped} already done" if skipped else "")
        + (f", {workers} worker processes" if workers > 1 else ", in this process")
    )
    if workers > 1:
        _run_in_workers(spec, manifest, todo, workers)
    elif spec.mode != "sequential" and len(todo) > 1:
        _run_maybe_packed(spec, manifest, todo, show_progress)
    else:
        _run_in_process(spec, manifest, todo, show_progress)


def group_by_base(trials: list[Trial]) -> list[Trial]:
    """Trials sharing a base next to each other (first-seen order kept), so each loads once."""
    groups: dict[str, list[Trial]] = {}
    for trial in trials:
        groups.setdefault(base_key(trial.config), []).append(trial)
    return [t for group in groups.values() for t in group]


def visible_gpus() -> list[str]:
    """CUDA device ids as the parent sees them (CUDA_VISIBLE_DEVICES respected)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def worker_count(parallel: str | int, n_trials: int) -> int:
    """auto: one worker per visible GPU when there are several, else in-process (1)."""
    gpus = len(visible_gpus())
    if parallel == "auto":
        wanted = gpus if gpus > 1 else 1
    else:
        wanted = int(parallel)
        if gpus and wanted > gpus:
            console.print(f"[yellow]sweep.parallel={wanted} but {gpus} GPU(s): using {gpus}[/yellow]")
            wanted = gpus
    return max(1, min(wanted, n_trials))


# ---------------------------------------------------------------- one trial


def load_base(trial: Trial) -> Any:
    """The trial's base model on this process's device."""
    from loralab.train.loop import load_base as load_config_base

    return load_config_base(trial.config)


class SharedBase:
    """The base model a process's trials share, loaded again only when a trial's differs.
    Callers pass `get(trial)` straight on and keep no reference of their own, so the old model
    is unreferenced (and freed) before the next one loads: two 7B bases do not fit one GPU."""

    def __init__(self) -> None:
        self.base: Any = None
        self.key: str | None = None

    def get(self, trial: Trial) -> Any:
        key = base_key(trial.config)
        if self.base is None or key != self.key:
            self.base = self.key = None
            free_memory()
            self.base, self.key = load_base(trial), key
        return self.base


def execute_trial(trial: Trial, base: Any, show_progress: bool) -> tuple[str, dict[str, Any]]:
    """Train one trial on `base`; any failure but Ctrl-C is a result, not a crash of the sweep."""
    from loralab.train.loop import train_run

    try:
        # The sweep owns its trial directories: an unfinished one is started again.
        result = train_run(trial.config, base=base, overwrite=True, show_progress=show_progress)
    except Exception as exc:  # NaN loss, out of memory, bad data...: record it and go on
        free_memory()
        return "failed", {"error": f"{type(exc).__name__}: {exc}"}
    return "done", {"result": result_summary(result), "error": None}


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _report(spec: SweepSpec, manifest: dict[str, Any], name: str, status: str, fields: dict) -> None:
    mark(manifest, name, status, **fields)
    save_manifest(spec.output_dir, manifest)
    if status == "running":
        return
    if status == "done":
        r = fields["result"]
        line = f"[green]done[/green]: loss {r['final_loss']:.6g}, {r['wall_seconds']:.1f} s"
    elif status == "interrupted":
        line = f"[yellow]{fields.get('error')}[/yellow]"
    else:
        line = f"[red]{status}[/red]: {fields.get('error')}"
    console.print(f"{_position(manifest, name)} {name}: {line}", highlight=False)


def _position(manifest: dict[str, Any], name: str) -> str:
    """[k/N]: the trial's place in the sweep (not a count of finished trials)."""
    names = [e["name"] for e in manifest["trials"]]
    return f"[{names.index(name) + 1}/{len(names)}]"


def _announce(manifest: dict[str, Any], trial: Trial) -> None:
    """A header above each in-process trial's data summary and progress, naming it."""
    changes = " ".join(f"{k}={v}" for k, v in trial.overrides.items())
    console.print(f"\n[bold]{_position(manifest, trial.name)} trial {trial.name}[/bold] {changes}",
                  highlight=False)


# ---------------------------------------------------------------- in this process


def _run_in_process(spec: SweepSpec, manifest: dict, todo: list[Trial], show_progress: bool,
                    bases: SharedBase | None = None) -> None:
    bases = bases or SharedBase()
    with compiled_code_reused():
        _train_one_by_one(spec, manifest, todo, show_progress, bases)


def _train_one_by_one(spec: SweepSpec, manifest: dict, todo: list[Trial], show_progress: bool,
                      bases: SharedBase) -> None:
    for trial in todo:
        _report(spec, manifest, trial.name, "running", {"worker": None})
        if show_progress:
            _announce(manifest, trial)
        try:
            status, fields = execute_trial(trial, bases.get(trial), show_progress)
        except KeyboardInterrupt:
            _report(spec, manifest, trial.name, "interrupted", {"error": INTERRUPTED})
            raise
        except Exception as exc:  # the base model did not load: this trial fails, others may not
            status, fields = "failed", {"error": f"base model: {type(exc).__name__}: {exc}"}
        _report(spec, manifest, trial.name, status, fields)


def _run_maybe_packed(spec: SweepSpec, manifest: dict, todo: list[Trial], show_progress: bool) -> None:
    """sweep.mode packed|auto: the mode decided with the loaded base (memory on a GPU), then
    the trials trained together, or one after another."""
    from loralab.sweep.mode import choose, combined_config, unpackable

    bases = SharedBase()
    cuda = bool(visible_gpus())
    if spec.mode == "auto" and (unpackable(todo) or not cuda):  # decided without the base
        choice = choose(spec.mode, todo, cuda)
        console.print(f"sweep mode {choice.mode} ({choice.reason})")
        _run_in_process(spec, manifest, todo, show_progress, bases)
        return
    planned = None
    try:
        base = bases.get(todo[0])
    except Exception as exc:  # no base: every trial fails with the reason, as sequentially
        for trial in todo:
            _report(spec, manifest, trial.name, "failed",
                    {"error": f"base model: {type(exc).__name__}: {exc}"})
        return
    if base.device.type == "cuda" and not unpackable(todo):
        planned = _plan_combined(combined_config(todo), base)
    choice = choose(spec.mode, todo, base.device.type == "cuda", planned,
                    sum(p.numel() for p in base.model.parameters()))
    console.print(f"sweep mode {choice.mode} ({choice.reason})"
                  + (f": {choice.together} trials together" if choice.mode == "packed" else ""))
    if choice.mode == "sequential":
        _run_in_process(spec, manifest, todo, show_progress, bases)
        return
    from loralab.sweep.packed import run_packed

    def report(name: str, status: str, fields: dict) -> None:
        _report(spec, manifest, name, status, fields)

    try:
        with compiled_code_reused():  # trials leaving change Σr: one graph, made dynamic
            run_packed(todo, base, report, show_progress)
        return
    except KeyboardInterrupt:
        for entry in manifest["trials"]:
            if entry["status"] == "running":
                mark(manifest, entry["name"], "interrupted", error=INTERRUPTED)
        save_manifest(spec.output_dir, manifest)
        raise
    except Exception as exc:  # of the combined step (out of memory...): not one trial's fault
        error = (str(exc).splitlines() or [""])[0][:200]
        error = f"{type(exc).__name__}: {error}"
    _fall_back(spec, manifest, todo, show_progress, bases, error)


def _fall_back(spec: SweepSpec, manifest: dict, todo: list[Trial], show_progress: bool,
               bases: SharedBase, error: str) -> None:
    """The packed pass failed as a whole: its unfinished trials train one by one, from their
    start, as a sequential sweep would (the finished and failed ones keep their results)."""
    left = [t for t in todo if trial_entry(manifest, t.name)["status"] == "running"]
    console.print(f"[yellow]packed training stopped ({error}): {len(left)} unfinished trial(s) "
                  "train one by one[/yellow]", highlight=False)
    free_memory()  # the failed pass's tensors (the exception's frames are gone by now)
    _run_in_process(spec, manifest, left, show_progress, bases)


def _plan_combined(cfg: Any, base: Any) -> Any:
    """levers.plan for the combined step (its examples are what the memory plan needs)."""
    from loralab.data.summary import build_dataset
    from loralab.train import levers

    try:
        examples, _ = build_dataset(cfg.data, base.tokenizer, cfg.train.seed)
    except Exception:  # the first trial's data is bad: it will fail on its own; plan without
        return None
    return levers.resolve(cfg, base.model, base.device, examples)


# ---------------------------------------------------------------- worker processes


def _run_in_workers(spec: SweepSpec, manifest: dict, todo: list[Trial], n: int) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for trial in todo:
        tasks.put(trial)
    for _ in range(n):
        tasks.put(None)  # one stop sign per worker
    gpus = visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = []
    for i in range(n):
        device = gpus[i] if gpus else None
        proc = ctx.Process(target=worker_main, args=(i, device, tasks, results, threads), daemon=True)
        with _env("CUDA_VISIBLE_DEVICES", device):
            proc.start()
        procs.append(proc)
    holding: dict[int, str] = {}  # worker → the trial it is training
    try:
        _collect(spec, manifest, procs, results, holding, {t.name for t in todo})
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for name in holding.values():
            mark(manifest, name, "interrupted", error=INTERRUPTED)
        save_manifest(spec.output_dir, manifest)
        raise
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _collect(spec, manifest, procs, results, holding: dict[int, str], remaining: set[str]) -> None:
    """Apply worker reports to the manifest until every trial is finished or no worker is left."""
    while remaining:
        try:
            worker, name, status, fields = results.get(timeout=1.0)
        except queue.Empty:
            _fail_crashed(spec, manifest, procs, holding, remaining)
            if not any(p.is_alive() for p in procs) and results.empty():
                break
            continue
        if status == "running":
            holding[worker] = name
        else:
            holding.pop(worker, None)
            remaining.discard(name)
        _report(spec, manifest, name, status, fields)


def _fail_crashed(spec, manifest, procs, holding: dict[int, str], remaining: set[str]) -> None:
    for i, proc in enumerate(procs):
        if proc.exitcode not in (None, 0) and i in holding:
            name = holding.pop(i)
            remaining.discard(name)
            error = f"worker {i} died (exit code {proc.exitcode}: killed, or out of host memory?)"
            _report(spec, manifest, name, "failed", {"error": error})


def worker_main(index: int, device: str | None, tasks: Any, results: Any, threads: int) -> None:
    """A worker: pinned to one GPU (or CPU threads), pulls trials until the stop sign."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    else:
        torch.set_num_threads(threads)
    bases = SharedBase()
    with compiled_code_reused():
        _work(index, device, tasks, results, bases)


def _work(index: int, device: str | None, tasks: Any, results: Any, bases: SharedBase) -> None:
    while (trial := tasks.get()) is not None:
        results.put((index, trial.name, "running", {"worker": index, "device": device or "cpu"}))
        try:
            status, fields = execute_trial(trial, bases.get(trial), show_progress=False)
        except Exception as exc:
            status, fields = "failed", {"error": f"base model: {type(exc).__name__}: {exc}"}
        results.put((index, trial.name, status, fields))


@contextlib.contextmanager
def _env(key: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def sweep_status_line(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts(manifest).items())
