"""`loralab eval`: load the base once, generate and score with it and every adapter, compare.

Everything the user can get wrong (folders, bases, the eval file, the config) is checked
before any weights are loaded. Files written follow the contract in `loralab.scoring.tasks`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loralab.config import Config, get_dotted, load_config, read_yaml_mapping
from loralab.errors import UserError
from loralab.evaluate import run_dirs
from loralab.layout import (
    ADAPTER_CONFIG,
    CHECKPOINT_CURVE,
    COMPARISON,
    SWEEP_MANIFEST,
    ComparisonDir,
    RunDir,
    SweepDir,
)

if TYPE_CHECKING:
    from loralab.engine import AdapterSource, LoraWeights


@dataclass
class AdapterRun:
    """One adapter to evaluate: its folder, display name and the base it was trained on."""

    path: Path
    name: str
    base: str  # the run's model.path, else adapter_config's base_model_name_or_path
    system_prompt: str | None
    config_dir: Path  # holds the run's config.yaml (the run, for a checkpoint)
    step: int | None = None  # the optimizer step of a checkpoint (a curve: every target)


# ---------------------------------------------------------------- folders and bases


def expand_adapter_dirs(paths: list[Path]) -> list[tuple[Path, str]]:
    """(adapter folder, name) for run folders and the finished trials of sweep folders."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"adapter folder not found: {path}")
        if SweepDir(path).has_manifest() and not RunDir(path).has_adapter():
            found += _finished_trials(path)
        elif RunDir(path).has_adapter():
            found.append((path, run_dirs.display_name(path)))
        else:
            raise UserError(f"{path} holds no {ADAPTER_CONFIG} or {SWEEP_MANIFEST}: "
                            "give a trained run folder or a sweep folder")
    return found


def _finished_trials(sweep_dir: Path) -> list[tuple[Path, str]]:
    sweep = SweepDir(sweep_dir)
    done = sweep.trial_dirs(only_done=True)
    if not done:
        total = len((sweep.read_manifest() or {}).get("trials", []))
        raise UserError(f"sweep {sweep_dir} has no finished trial ({total} trials): "
                        "nothing to evaluate yet")
    for name, path in done:
        if not RunDir(path).has_adapter():
            raise UserError(f"trial {name} is marked done but {path} has no adapter")
    return [(path, name) for name, path in done]


def run_config_raw(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a mapping ({} for a bare PEFT adapter folder)."""
    path = RunDir(run_dir).config
    return read_yaml_mapping(path) if path.is_file() else {}


def adapter_run(path: Path, name: str, step: int | None = None) -> AdapterRun:
    """A run folder, a checkpoint of one (its config two levels up) or a bare PEFT folder."""
    home = run_dirs.config_dir(path)
    raw = run_config_raw(home)
    adapter_cfg = _read_adapter_config(path)
    base = get_dotted(raw, "model.path") or adapter_cfg.get("base_model_name_or_path") or ""
    return AdapterRun(Path(path), name, str(base), get_dotted(raw, "data.system_prompt"), home,
                      step if step is not None else run_dirs.checkpoint_step(path))


def _read_adapter_config(path: Path) -> dict[str, Any]:
    file = RunDir(path).adapter_config
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"{file} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object")
    return data


def check_same_base(model_path: str, resolved: str | None, runs: list[AdapterRun]) -> None:
    """Every adapter must come from the base being loaded: a LoRA is a delta on one base."""
    for run in runs:
        ok = run_dirs.same_base(run.base, model_path) or (
            resolved is not None and run_dirs.same_base(run.base, resolved))
        if not ok:
            raise UserError(
                f"adapter {run.path} was trained on base {run.base!r}, but this evaluation's base is "
                f"{model_path!r}: evaluate adapters of one base model at a time"
            )


def single_run(adapter: Path) -> tuple[AdapterRun, Config]:
    """One adapter folder and its config, for predict, chat and merge (no weights loaded)."""
    path, name = expand_adapter_dirs([Path(adapter)])[0]
    run = adapter_run(path, name)
    # A bare PEFT folder has no training file; these commands need none.
    bare = not RunDir(run.config_dir).has_config()
    return run, eval_config(None, [run], ["data.path=(none)"] if bare else [])


def eval_config(config: Path | None, runs: list[AdapterRun], overrides: list[str]) -> Config:
    """--config, else the first adapter run's config.yaml; key=value overrides on top."""
    if config is not None:
        return load_config(config, overrides)
    if runs and RunDir(runs[0].config_dir).has_config():
        return load_config(RunDir(runs[0].config_dir).config, overrides)
    if runs:
        return load_config(None, [f"model.path={runs[0].base}", *overrides])
    return load_config(None, overrides)


# ---------------------------------------------------------------- records


def read_eval_records(path: str | Path, limit: int | None) -> list:
    """The eval records (any training-file format), the first `limit` of them."""
    from loralab.data.records import read_records

    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be > 0, got {limit}")
    records = read_records(path)
    return records[:limit] if limit else records


def last_user_text(record: Any) -> str:
    return next(m["content"] for m in reversed(record.messages) if m["role"] == "user")


def check_references(task: Any, records: list) -> None:
    """Score an empty answer against every reference now: a bad eval file fails in seconds."""
    for record in records:
        try:
            task.score("", record.answer)
        except UserError as exc:
            raise UserError(f"eval record {record.index}: {exc}") from None


def render_prompts(tokenizer: Any, records: list, system_prompt: str | None) -> list[str]:
    from loralab.data.records import apply_system_prompt
    from loralab.data.render import render_prompt

    return [render_prompt(tokenizer, r.system, r.messages)
            for r in apply_system_prompt(records, system_prompt)]


# ---------------------------------------------------------------- one target


COMPILE_AUTO_TOKENS = 600_000  # planned new tokens from which compiling pays (see docs/eval.md)


def want_compile(mode: str | bool, on_cuda: bool, planned_new_tokens: int) -> bool:
    """--compile on/off as given; auto: on CUDA when the eval plans enough new tokens for the
    ~15% faster runs to repay a compile (26-35 s the first time in a process on a 7B)."""
    if mode in (True, "on"):
        return True
    if mode in (False, "off"):
        return False
    return on_cuda and planned_new_tokens >= COMPILE_AUTO_TOKENS


def gen_settings(cfg: Config, max_new_tokens: int, engine: str = "auto",
                 compile_decode: bool = False):
    from loralab.engine import GenSettings

    e = cfg.eval
    return GenSettings(max_new_tokens=max_new_tokens, batch_size=e.batch_size,
                       do_sample=e.do_sample, temperature=e.temperature, top_p=e.top_p,
                       engine=engine, seed=cfg.train.seed, compile=compile_decode)


@dataclass
class EvalContext:
    """What every adapter of one `loralab eval` is evaluated with."""

    model: Any
    tokenizer: Any
    records: list
    task: Any
    settings: Any
    bootstrap: int
    system_prompt: str | None
    merge: bool


def evaluate_group(ctx: EvalContext, runs: list[AdapterRun], indices: range,
                   adapters: AdapterSource):
    """Yield (run, metrics) for runs[indices], in order. Adapters read as tensors that share
    their prompts generate in one batch (eval.adapter_batch); the rest one at a time."""
    import torch

    from loralab.scoring.tasks import hyperparams_from_run

    group = [i for i in indices if i < len(runs)]
    prompts = {i: render_prompts(ctx.tokenizer, ctx.records,
                                 runs[i].system_prompt or ctx.system_prompt) for i in group}
    fetched = {i: adapters.tensors(i) for i in group}
    folded = [i for i in group if fetched[i][0] is not None]
    together = [i for i in folded if prompts[i] == prompts[folded[0]]] if folded else []
    shared = {}
    if len(together) > 1:
        try:
            outs = _generate_together(ctx, prompts[together[0]],
                                      [fetched[i][0] for i in together])
            shared = dict(zip(together, outs, strict=True))
        except torch.cuda.OutOfMemoryError:  # K x the rows did not fit: one at a time instead
            torch.cuda.empty_cache()
            print(f"{len(together)} adapters per batch ran out of GPU memory: evaluating them "
                  "one at a time (lower eval.adapter_batch or eval.batch_size)", flush=True)
    for i in group:
        run = runs[i]
        meta = {"target": run.name, "kind": "adapter", "run_dir": str(run.path.resolve()),
                "hyperparams": hyperparams_from_run(run.config_dir)
                if RunDir(run.config_dir).has_config() else {}}
        if run.step is not None:
            meta["step"] = run.step
        if i in shared:
            how = f"unmerged in loralab's forward, {len(together)} adapters per batch"
            yield run, evaluate_target(ctx, ctx.model, prompts[i], {**meta, "adapter_weights": how},
                                       RunDir(run.path).eval, generated=shared[i])
            continue
        with adapters.on_base(i, run.path, ctx.merge, fetched[i]) as (target, lora, how):
            yield run, evaluate_target(ctx, target, prompts[i], {**meta, "adapter_weights": how},
                                       RunDir(run.path).eval, lora=lora)


def _generate_together(ctx: EvalContext, prompts: list[str], loras: list) -> list[tuple]:
    """(generations, stats) per adapter, their rows sharing every batch; each adapter's seconds
    are the call's seconds / K."""
    from dataclasses import replace

    from loralab.engine import generate

    per_adapter, stats = generate(ctx.model, ctx.tokenizer, prompts, ctx.settings, loras)
    share = stats.seconds / len(loras)
    return [(gens, replace(stats, seconds=share, new_tokens=sum(g.new_tokens for g in gens)))
            for gens in per_adapter]


def evaluate_target(ctx: EvalContext, model: Any, prompts: list[str], meta: dict[str, Any],
                    folder: Path, lora: LoraWeights | None = None,
                    generated: tuple | None = None) -> dict:
    """Generate, score and write one target's predictions.jsonl and metrics.json. `lora`: an
    adapter read as tensors (adapters.AdapterSource), folded into the engine's own forward;
    `generated`: (generations, stats) already made with other adapters in one batch."""
    from loralab.engine import generate
    from loralab.scoring.tasks import score_predictions, write_target_results

    records, task, settings = ctx.records, ctx.task, ctx.settings
    generations, stats = generated or generate(model, ctx.tokenizer, prompts, settings, lora)
    rows = [
        {"input": last_user_text(r), "reference": r.answer, "generation": g.text,
         "finished": g.finished, "new_tokens": g.new_tokens}
        for r, g in zip(records, generations, strict=True)
    ]
    scored, metrics = score_predictions(task, rows, bootstrap=ctx.bootstrap)
    gen = {**stats.as_dict(), "max_new_tokens": settings.max_new_tokens,
           "batch_size": settings.batch_size, "do_sample": settings.do_sample,
           "cuda_graph": stats.cuda_graph, "fast_forward": stats.fast_forward}
    metrics = {**meta, **metrics, "gen": gen}
    write_target_results(folder, scored, metrics)
    return metrics


def log_to_tracker(run: AdapterRun, metrics: dict[str, Any]) -> None:
    """Eval metrics into the trial's tracker (SwanLab) as '<run>-eval'; never fails the eval."""
    import importlib.util

    from loralab.config import config_from_dict

    raw = run_config_raw(run.config_dir)
    try:
        tracking = config_from_dict({"tracking": raw.get("tracking") or {}}).tracking
    except UserError:
        return
    if tracking.backend != "swanlab" or importlib.util.find_spec("swanlab") is None:
        return
    try:
        from loralab.train.tracking import start_tracker

        tracking.experiment = f"{tracking.experiment or run.path.name}-eval"
        tracker = start_tracker(tracking, run.path, {"run_dir": str(run.path), **raw})
        numbers = {f"eval/{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.log(numbers, int(get_dotted(RunDir(run.path).read_result(), "steps") or 0))
        tracker.finish()
    except Exception as exc:  # tracking is a convenience; the files are the record
        print(f"loralab: tracking of {run.name} skipped ({type(exc).__name__}: {exc})")


# ---------------------------------------------------------------- the command


def comparison_dir(out: Path | None, adapter_args: list[Path]) -> Path:
    if out is not None:
        return Path(out)
    if not adapter_args:
        raise UserError("--base without --adapters needs --out for the comparison folder")
    return Path(adapter_args[0]) / COMPARISON


def run_eval(data: Path | None, adapter_args: list[Path], base: bool, limit: int | None,
             out: Path | None, config: Path | None, overrides: list[str],
             engine: str = "auto", device: str | None = None,
             compile_decode: str | bool = "auto", curve_of: Path | None = None) -> dict[str, Any]:
    """The whole `loralab eval`; returns {"comparison_dir", "targets"}. curve_of: a run whose
    checkpoints and final adapter are evaluated, each target labelled with its step."""
    from loralab.data.records import mix_paths, read_records
    from loralab.engine import AdapterSource, default_max_new_tokens
    from loralab.model.load import load_base_model, load_tokenizer_for, resolve_tokenizer_path
    from loralab.scoring.references import score_references
    from loralab.scoring.tasks import get_task

    if not adapter_args and not base and curve_of is None:
        raise UserError("nothing to evaluate: give --adapters RUN_OR_SWEEP ... and/or --base")
    runs = [adapter_run(p, n) for p, n in expand_adapter_dirs(adapter_args)]
    if curve_of is not None:
        runs += [adapter_run(p, n, step) for p, n, step in run_dirs.checkpoint_curve(curve_of)]
        out = out or Path(curve_of) / CHECKPOINT_CURVE
    cfg = eval_config(config, runs, overrides)
    check_same_base(cfg.model.path, None, runs)
    comp = comparison_dir(out, adapter_args)
    eval_path = data or cfg.data.eval_path
    if not eval_path:
        raise UserError("no eval file: give --data EVAL.json or set data.eval_path")
    records = read_eval_records(eval_path, limit)
    task = get_task(cfg.eval)
    check_references(task, records)
    train_answers = [r.answer for path in mix_paths(cfg.data.path) for r in read_records(path)]
    tokenizer = load_tokenizer_for(resolve_tokenizer_path(cfg.model))
    max_new = cfg.eval.max_new_tokens or default_max_new_tokens(
        tokenizer, [r.answer for r in records])
    model, tokenizer = load_base_model(cfg.model, device)
    planned = (len(runs) + bool(base)) * len(records) * max_new
    on_cuda = next(model.parameters()).device.type == "cuda"
    settings = gen_settings(cfg, max_new, engine, want_compile(compile_decode, on_cuda, planned))
    targets: list[Path] = []
    ctx = EvalContext(model, tokenizer, records, task, settings, cfg.eval.bootstrap,
                      cfg.data.system_prompt, cfg.eval.merge)
    if base:
        prompts = render_prompts(tokenizer, records, cfg.data.system_prompt)
        meta = {"target": "base", "kind": "base", "run_dir": None}
        base_dir = ComparisonDir(comp).base
        _announce("base", evaluate_target(ctx, model, prompts, meta, base_dir), task)
        targets.append(base_dir)
    adapters = AdapterSource(model, [run.path for run in runs], settings)
    size = cfg.eval.adapter_batch if adapters.reason is None else 1
    try:
        for start in range(0, len(runs), size):
            for run, metrics in evaluate_group(ctx, runs, range(start, start + size), adapters):
                _announce(run.name, metrics, task)
                if cfg.tracking.backend != "none":
                    log_to_tracker(run, metrics)
                targets.append(RunDir(run.path).eval)
    finally:
        adapters.close()
    eval_rows = [{"input": last_user_text(r), "reference": r.answer} for r in records]
    targets += score_references(cfg.eval, train_answers, eval_rows, comp,
                                bootstrap=cfg.eval.bootstrap)
    ComparisonDir(comp).write_targets(targets)
    return {"comparison_dir": comp, "targets": targets}


def _announce(name: str, metrics: dict[str, Any], task: Any) -> None:
    gen = metrics.get("gen", {})
    shown = ", ".join(f"{m} {metrics[m]:.3f}" for m in task.headline if m in metrics)
    rate = gen.get("tokens_per_s") or 0
    print(f"{name}: {shown} ({gen.get('new_tokens')} new tokens, {rate:,.0f} tokens/s)",
          flush=True)

