"""`loralab serve` (no torch or web framework at import: `loralab --help` stays fast)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from loralab.errors import UserError

NEEDS = ("fastapi", "uvicorn", "sse_starlette")

EXAMPLES = """examples:
  loralab serve --adapters runs/sweeps/rank          # every finished trial, base from the runs
  loralab serve --base Qwen/Qwen2.5-7B-Instruct --adapters r8=runs/r8 r16=runs/r16
  curl http://127.0.0.1:8000/v1/models
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "r8", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}'

docs/serve.md: the API, limits, and serving the same adapters with vLLM."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve the base model and adapters behind an OpenAI-compatible API",
        description="One base model and many LoRA adapters behind an OpenAI-compatible HTTP "
        "API (/v1/chat/completions, /v1/completions, /v1/models), requests for different "
        "adapters decoded together (continuous batching). A request's `model` picks the base "
        "or an adapter.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model: hub id, folder or builtin:tiny-qwen2 (default: "
                   "the base the first adapter was trained on)")
    p.add_argument("--adapters", nargs="+", action="extend", default=[],
                   metavar="NAME=DIR|DIR", help="adapters: NAME=DIR, or a run folder (its "
                   "name) or a sweep folder (every finished trial under its trial name)")
    p.add_argument("--name", help="the base model's name in the API (default: --base)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LORALAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LORALAB_API_KEY)")
    p.add_argument("--engine", choices=["continuous", "naive"], default="continuous",
                   help="continuous: loralab's batch engine; naive: HF generate per request, "
                   "one at a time (a baseline; serves any model PEFT can)")
    p.add_argument("--max-rows", type=int, default=64, help="requests decoded at once")
    p.add_argument("--max-len", type=int, default=2048,
                   help="context: prompt + new tokens of one request")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a row before new ones get 429")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="new tokens of a request that does not say")
    p.add_argument("--max-adapters", type=int, default=16, help="adapters loaded at once")
    p.add_argument("--adapter-memory-gb", type=float, default=4.0,
                   help="memory the loaded adapters may take")
    p.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode eagerly on CUDA (debugging)")
    p.set_defaults(func=cmd_serve)


def missing_packages() -> list[str]:
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def check_args(args: argparse.Namespace) -> None:
    missing = missing_packages()
    if missing:
        raise UserError(f"loralab serve needs {', '.join(n.replace('_', '-') for n in missing)}: "
                        "pip install 'loralab[serve]' (fastapi, uvicorn, sse-starlette)")
    for flag, value, low in (("--max-rows", args.max_rows, 1), ("--max-len", args.max_len, 16),
                             ("--max-queue", args.max_queue, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--max-adapters", args.max_adapters, 0), ("--port", args.port, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}")
    if args.timeout <= 0 or args.adapter_memory_gb < 0:
        raise UserError("--timeout must be positive and --adapter-memory-gb not negative")
    if not args.base and not args.adapters:
        raise UserError("give --base MODEL, --adapters, or both")


def model_config(base: str | None, specs: list[tuple[str | None, Path]]):
    """The Config whose model section loads the base: --base, else the first adapter's run."""
    from loralab.config import load_config
    from loralab.evaluate.runner import single_run

    if base:
        return load_config(None, [f"model.path={base}", "data.path=(none)"])
    _, cfg = single_run(specs[0][1])
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    check_args(args)
    import uvicorn

    from loralab.model.load import load_base_model
    from loralab.serve.app import build_app
    from loralab.serve.registry import adapter_specs, expand
    from loralab.serve.server import ServeOptions, build_state

    specs = adapter_specs(args.adapters)
    for name, folder in specs:  # every folder checked before the base model loads
        expand(name, folder)
    cfg = model_config(args.base, specs)
    model, tokenizer = load_base_model(cfg.model, args.device, args.dtype)
    opts = ServeOptions(args.engine, args.max_rows, args.max_len, args.max_queue, args.timeout,
                        args.max_tokens, args.max_adapters, int(args.adapter_memory_gb * 2**30),
                        args.api_key, not args.no_cuda_graph)
    name = args.name or cfg.model.path
    state = build_state(model, tokenizer, name, cfg.model.path, specs, opts)
    state.scheduler.start()
    models = ", ".join(state.registry.names())
    print(f"loralab serve: http://{args.host}:{args.port}/v1 ({args.engine} engine; models: "
          f"{models})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        state.scheduler.stop()
    return 0
