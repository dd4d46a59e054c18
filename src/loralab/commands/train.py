"""`loralab train` and `loralab demo`."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console

from loralab import layout
from loralab.config import Config, load_config
from loralab.errors import UserError

console = Console()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one LoRA adapter from a config file",
        description="Train one LoRA adapter: the config's base model, data and hyperparameters "
                    "(YAML + key=value overrides) into output_dir, as a PEFT adapter with its "
                    "config.yaml, metrics.jsonl and result.json.",
        epilog="examples:\n"
               "  loralab train configs/qwen2.5-7b-instruct.yaml data.path=train.json\n"
               "  loralab train CONFIG lora.r=16 train.lr=2e-4 output_dir=runs/r16\n"
               "  loralab train CONFIG --dry-run        # config + data only, no weights\n"
               "  loralab train CONFIG --resume         # continue a killed run\n"
               "  loralab train CONFIG --nproc 2        # 2 GPUs, same training as one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 train.lr=2e-4")
    p.add_argument("--dry-run", action="store_true", help="check config and data, write data_summary.json, train nothing")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("several GPUs / machines (or use torchrun / accelerate launch)")
    g.add_argument("--nproc", type=int, default=1, help="processes on this machine, one per GPU")
    g.add_argument("--nnodes", type=int, default=1, help="machines in the job (default 1)")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    g.add_argument("--master-addr", help="address of the machine of rank 0 (needed with --nnodes > 1)")
    g.add_argument("--master-port", type=int, default=0, help="its port (needed with --nnodes > 1)")
    p.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="train the bundled demo on CPU (tiny random model, real tokenizer)")
    d.add_argument("overrides", nargs="*", help="dotted overrides for configs/demo.yaml")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.set_defaults(func=cmd_demo)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg)
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UserError("--nproc and --nnodes must be >= 1 and --node-rank in 0..nnodes-1")
    from loralab.rundir import job_size, process_rank

    if args.nproc * args.nnodes > 1 and job_size() == 1:  # not yet inside a launched job
        return _launch(args)
    from loralab.train import dist
    from loralab.train.loop import train_run

    try:
        result = train_run(
            cfg, resume=args.resume, overwrite=args.overwrite, show_progress=not args.quiet
        )
    except dist.PeerFailed:
        return 2  # the main process refused the run and said why
    except Exception as exc:
        if not dist.lost_a_peer(exc):
            raise
        print(f"loralab: error: rank {process_rank()} lost another process of the job "
              f"({str(exc).splitlines()[0][:160]})", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
    if process_rank() == 0:
        _print_result(result)
    return 0


def _launch(args: argparse.Namespace) -> int:
    from loralab.train.launch import Topology, launch

    argv = ["train", args.config, *args.overrides]
    argv += [f"--{flag}" for flag in ("resume", "overwrite", "quiet") if getattr(args, flag)]
    if args.nnodes > 1 and not (args.master_addr and args.master_port):
        raise UserError("--nnodes > 1 needs --master-addr (the machine of rank 0) and "
                        "--master-port, the same on every machine")
    top = Topology(args.nproc, args.nnodes, args.node_rank, args.master_addr or "127.0.0.1",
                   args.master_port)
    return launch(argv, top)


def dry_run(cfg: Config) -> int:
    """Validate config and data with the tokenizer only: no model weights are loaded."""
    from loralab.data.summary import build_dataset, print_summary
    from loralab.io import write_json
    from loralab.model.load import resolve_tokenizer_path
    from loralab.model.tokenizer import load_tokenizer
    from loralab.rundir import claim, folder_lock, is_empty
    from loralab.train import checkpoint as ckpt

    tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.model))
    _, summary = build_dataset(cfg.data, tokenizer, cfg.train.seed)
    print_summary(summary)
    folder = layout.RunDir(cfg.output_dir)
    if not (is_empty(folder.path) or ckpt.holds_only_a_dry_run(folder.path)):
        # A run, or a user's folder: write nothing into it.
        console.print(f"{folder.path} is not empty: {layout.DATA_SUMMARY} not written there")
        return 0
    with folder_lock(folder.path):  # marked as loralab's: the training run may use it next
        claim(folder.path, "run")
        write_json(folder.data_summary, summary)
    console.print(f"config and data OK; data summary written to {folder.data_summary}")
    return 0


def demo_config_path() -> Path:
    return Path(str(resources.files("loralab") / "resources" / "configs" / "demo.yaml"))


def cmd_demo(args: argparse.Namespace) -> int:
    from loralab.train.checkpoint import is_run_dir
    from loralab.train.loop import train_run

    cfg = load_config(demo_config_path(), [f"output_dir={args.out}", *args.overrides])
    run_dir = Path(cfg.output_dir)
    # Re-running the demo replaces the previous demo, never another kind of run.
    if is_run_dir(run_dir) and not _is_demo_run(run_dir):
        raise UserError(f"{run_dir} holds a run that is not a demo; use --out to pick another folder")
    console.print("[bold]loralab demo[/bold]: LoRA SFT of a tiny random-weight Qwen2 model with the real "
                  "Qwen2.5 tokenizer on the bundled tag-scoring records, on CPU.")
    result = train_run(cfg, overwrite=is_run_dir(run_dir))
    _print_result(result)
    console.print(
        "\n[bold]Note[/bold]: this model has random weights and 2 tiny layers. A falling loss shows the "
        "pipeline trains end to end (data, chat template, LoRA, checkpoints, tracking); a random "
        "model cannot learn the task, and in a few steps not even the answer format. For real "
        "results use model.path=Qwen/Qwen2.5-7B-Instruct (configs/qwen2.5-7b-instruct.yaml)."
    )
    return 0


def _is_demo_run(run_dir: Path) -> bool:
    from loralab.config import get_dotted, read_yaml_mapping

    folder = layout.RunDir(run_dir)
    if not folder.has_config():
        return False
    model_path = get_dotted(read_yaml_mapping(folder.config), "model.path") or ""
    return str(model_path).startswith("builtin:")


def _print_result(result: dict) -> None:
    folder = layout.RunDir(result["run_dir"])
    run_dir = folder.path
    console.print(
        f"\n[green]done[/green]: {result['steps']} steps, loss {result['first_loss']:.4f} → "
        f"{result['final_loss']:.4f}, {result['tokens_per_s']:,.0f} tokens/s, "
        f"{result['wall_seconds']:.1f} s wall, peak memory {result['peak_memory_gb']:.2f} GB"
    )
    if result.get("best_eval_loss") is not None:
        console.print(f"held-out loss {result['eval_loss']:.4f} (best {result['best_eval_loss']:.4f} "
                      f"at step {result['best_step']})"
                      + ("; stopped early" if result.get("stopped_early") else ""), highlight=False)
    if result.get("adapter"):
        console.print(f"the adapter saved is the {result['adapter']}", highlight=False)
    console.print(f"adapter:  {run_dir}  (peft.PeftModel.from_pretrained(base, '{run_dir}'))")
    console.print(f"metrics:  {folder.step_metrics}, {folder.result}")
    tracker = result.get("tracker") or {}
    if tracker.get("backend") == "swanlab" and tracker.get("log_dir"):
        console.print(f"dashboard: swanlab watch {tracker['log_dir']}  (then open http://127.0.0.1:5092)")
    elif tracker.get("backend") == "tensorboard":
        console.print(f"dashboard: tensorboard --logdir {Path(tracker['log_dir']).parent}")
