"""`loralab sweep SWEEP.yaml [key=value ...] [--dry-run] [--resume] [--overwrite]`."""

from __future__ import annotations

import argparse
import math
import shlex
from typing import Any

from rich.console import Console

from loralab import layout
from loralab.sweep.spec import SweepSpec, Trial, load_sweep

console = Console()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train many adapters from one sweep file (grid/trials), the base model loaded once",
        description="Train every trial of a sweep file: grid (Cartesian product) and/or trials, "
        "each in SWEEP_DIR/<trial name>; sweep.json records status and results.",
    )
    p.add_argument("sweep_file", help="sweep YAML (see configs/sweeps/)")
    p.add_argument(
        "overrides", nargs="*",
        help="dotted overrides for every trial (e.g. train.max_steps=10); also output_dir=DIR, "
        "sweep.parallel=N and sweep.mode=packed|sequential|auto",
    )
    p.add_argument("--dry-run", action="store_true",
                   help="list the trials, the tokens each will train on, the mode (packed: how "
                   "many together, predicted memory); load no model")
    p.add_argument("--resume", action="store_true", help="skip finished trials, rerun the rest")
    p.add_argument("--overwrite", action="store_true", help="replace the sweep in the output dir")
    p.add_argument("--quiet", action="store_true", help="no per-step progress bar")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = load_sweep(args.sweep_file, args.overrides)
    if args.dry_run:
        return dry_run(spec)
    from loralab.layout import SweepDir
    from loralab.sweep.runner import run_sweep, sweep_status_line
    from loralab.sweep.summary import write_summary

    try:
        manifest = run_sweep(spec, resume=args.resume, overwrite=args.overwrite,
                             show_progress=not args.quiet)
    except KeyboardInterrupt:
        manifest = SweepDir(spec.output_dir).read_manifest()
        if manifest:
            write_summary(manifest, spec.output_dir)
        again = " ".join(shlex.quote(a) for a in [args.sweep_file, *args.overrides])
        console.print(f"[yellow]interrupted[/yellow]: loralab sweep {again} --resume finishes it",
                      highlight=False)
        return 130
    written = write_summary(manifest, spec.output_dir)
    console.print(f"{sweep_status_line(manifest)}; written: "
                  + ", ".join(str(p) for p in [spec.output_dir / layout.SWEEP_MANIFEST, *written]))
    failed = [e["name"] for e in manifest["trials"] if e["status"] != "done"]
    return 1 if failed else 0


# ---------------------------------------------------------------- --dry-run


def dry_run(spec: SweepSpec) -> int:
    """The trials and their work, from the tokenizer only: no model weights are loaded."""
    from rich.table import Table

    rows = [estimate_work(t) for t in spec.trials]
    table = Table(title=f"sweep {spec.name}: {len(rows)} trials → {spec.output_dir}")
    for col in ("trial", "overrides", "records", "steps", "tokens"):
        table.add_column(col, justify="right" if col in ("records", "steps", "tokens") else "left")
    for trial, row in zip(spec.trials, rows, strict=True):
        changes = " ".join(f"{k}={v}" for k, v in trial.overrides.items())
        table.add_row(trial.name, changes, str(row["records"]), str(row["steps"]), f"{row['tokens']:,}")
    console.print(table)
    total = sum(r["tokens"] for r in rows)
    console.print(f"{len(rows)} trials, {sum(r['steps'] for r in rows):,} optimizer steps, "
                  f"~{total:,} tokens in all (records x epochs x mean length); nothing trained")
    console.print(mode_line(spec), highlight=False)
    return 0


def mode_line(spec: SweepSpec, gpu_gib: float | None = None) -> str:
    """What `loralab sweep` will do: packed or sequential, how many together, predicted peak
    (on this machine's GPU, or a card of `gpu_gib`; without a GPU, what a GPU would do)."""
    import torch

    from loralab.sweep.mode import choose, combined_config, unpackable

    cuda = torch.cuda.is_available()
    planned, params = None, None
    if spec.mode != "sequential" and not unpackable(spec.trials):
        planned, params = _plan_packed(combined_config(spec.trials), gpu_gib)
    choice = choose(spec.mode, spec.trials, cuda or planned is not None, planned, params)
    where = "" if cuda else " (no GPU here: what a GPU would do; on the CPU auto is sequential)"
    if choice.mode == "sequential":
        return f"mode: sequential, one trial at a time ({choice.reason}){where}"
    peak = f", predicted peak {choice.predicted_gib:.1f} GiB" if choice.predicted_gib else ""
    return (f"mode: packed, {choice.together} trials together, {choice.micro_batches} "
            f"micro-batch(es) per step{peak} ({choice.reason}){where}")


def _plan_packed(cfg: Any, gpu_gib: float | None) -> tuple[Any, int | None]:
    """(levers.plan of the combined step on a GPU, the base's parameter count), from the
    model's config.json only."""
    from loralab.train.estimate import data_lengths, gpu_plans, model_shape

    try:
        shape = model_shape(cfg)
        lengths, labelled, _ = data_lengths(cfg)
    except Exception:  # unreadable model or data: the run itself will say so
        return None, None
    import torch

    card = gpu_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30
                       if torch.cuda.is_available() else 80.0)
    given, auto, _ = gpu_plans(cfg, shape, lengths, labelled, card)
    return (auto if cfg.train.memory == "auto" else given), shape.params


_TOKENIZERS: dict[str, Any] = {}


def estimate_work(trial: Trial) -> dict[str, int]:
    """Records kept, optimizer steps and tokens one trial trains on (tokenizer only)."""
    from loralab.data.summary import build_dataset

    cfg = trial.config
    # trials share the tokenizer object, so build_dataset encodes each record once
    _, summary = build_dataset(cfg.data, _tokenizer(cfg), cfg.train.seed)
    kept, mean = summary["kept"], summary["tokens"]["mean"]
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps_per_epoch = max(1, math.ceil(kept / per_step))
    steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    sequences = min(steps * per_step, kept * steps / steps_per_epoch)  # last step of an epoch is short
    return {"records": kept, "steps": steps, "tokens": int(round(sequences * mean))}


def _tokenizer(cfg) -> Any:
    from loralab.model.load import resolve_tokenizer_path
    from loralab.model.tokenizer import load_tokenizer

    path = resolve_tokenizer_path(cfg.model)
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]
