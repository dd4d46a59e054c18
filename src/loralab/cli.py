"""The `loralab` command: subcommands map to functions; user errors become one line and exit 2.

Each subcommand registers itself (`register(subparsers)` in `commands/<name>.py`), so this
file holds no logic and imports nothing heavy: `loralab --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys

from loralab import __version__
from loralab.errors import UserError

# Modules that add subcommands; each exposes register(subparsers) and sets `func` defaults.
# The order is `loralab --help`'s.
COMMAND_MODULES = (
    "loralab.commands.train",
    "loralab.commands.estimate",
    "loralab.commands.sweep",
    "loralab.commands.eval",
    "loralab.commands.merge",
    "loralab.commands.report",
    "loralab.commands.config",
    "loralab.commands.serve",
)


EXAMPLES = """examples:
  loralab demo                                   # tiny CPU run of the whole pipeline
  loralab config configs/qwen2.5-7b-instruct.yaml lora.r=16   # the resolved config
  loralab train configs/qwen2.5-7b-instruct.yaml data.path=train.json --dry-run
  loralab train configs/qwen2.5-7b-instruct.yaml data.path=train.json output_dir=runs/r8
  loralab train CONFIG --nproc 2                  # one process per GPU
  loralab sweep configs/sweeps/rank.yaml          # one adapter per grid point
  loralab eval --adapters runs/sweeps/rank --base # every trial vs the base model
  loralab report runs/sweeps/rank/comparison      # tables, PNGs, report.html
  loralab serve --adapters runs/sweeps/rank       # every trial behind an OpenAI-compatible API

'loralab COMMAND --help' describes each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loralab",
        description="LoRA supervised fine-tuning: train, sweep, evaluate and compare adapters.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"loralab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that area is not built yet
                continue
            raise
        module.register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also follow the flags.

    argparse stops filling a nargs='*' positional at the first flag, so in
    `loralab train cfg.yaml --dry-run lora.r=4` the override comes back as "unrecognized".
    """
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a crash of ours, not the user's: keep the traceback when asked
        if os.environ.get("LORALAB_DEBUG"):
            raise
        if _is_user_file_error(exc):
            print(f"loralab: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


# What the machine says, not loralab: a full disk, a file-size limit, a quota, permissions.
SYSTEM_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) say it


def _is_user_file_error(exc: BaseException, missing_file_counts: bool = True) -> bool:
    """A missing file named by the user (here or as the explicit cause), or what the machine
    says (full disk, size limit, permissions) anywhere in the chain. A missing file met while
    handling another error is not enough: that other error may be a bug of ours."""
    if missing_file_counts and isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return True
    if isinstance(exc, OSError) and exc.errno in SYSTEM_ERRNOS:
        return True
    found = _OS_ERROR_TEXT.search(str(exc))
    if found and int(found.group(1)) in SYSTEM_ERRNOS:
        return True
    if exc.__cause__ is not None and exc.__cause__ is not exc:
        return _is_user_file_error(exc.__cause__, missing_file_counts)
    context = None if exc.__suppress_context__ else exc.__context__
    return context is not None and context is not exc and _is_user_file_error(context, False)


def _one_line(exc: BaseException) -> str:
    """The OSError behind `exc` as one line, with what a full disk or size limit means."""
    seen = exc
    while not isinstance(seen, OSError) and (seen.__cause__ or seen.__context__) is not None:
        seen = seen.__cause__ or seen.__context__
    target = seen if isinstance(seen, OSError) else exc
    text = " ".join(str(target).split()) or type(target).__name__
    code = getattr(target, "errno", None)
    found = _OS_ERROR_TEXT.search(text)
    if code is None and found:
        code = int(found.group(1))
    if code == errno.ENOSPC:
        text += " (the disk is full: free space and run again, with --resume if it checkpointed)"
    elif code == errno.EFBIG:
        text += " (a file size limit: see ulimit -f)"
    return text[:500]


if __name__ == "__main__":
    sys.exit(main())
