"""`loralab estimate CONFIG [k=v ...]`: predicted peak GPU memory of the training step
(the memory model and the plans are train/estimate.py's)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `estimate` command to the CLI's subparsers."""
    p = sub.add_parser("estimate", help="predicted peak GPU memory of a training config")
    p.add_argument("config", help="training config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    p.add_argument("--gpu-gib", type=float, default=None,
                   help="card memory for the auto plan (default: this machine's GPU, else 24)")
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> int:
    from loralab.config import load_config
    from loralab.train.estimate import estimate_lines

    cfg = load_config(args.config, args.overrides)
    for line in estimate_lines(cfg, args.gpu_gib):
        print(line)
    return 0
