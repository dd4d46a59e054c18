"""`loralab serve` (no torch or web framework at import: `loralab --help` stays fast)."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

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
    p.add_argument("--insecure-no-api-key", action="store_true",
                   help="serve on a --host other than loopback without an API key (anyone who "
                   "can reach the port may then generate and load adapters from paths)")
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
                   help="memory the loaded adapters may take: each one's columns in the "
                   "stacked factors (every member of a projection group padded to its rank) "
                   "plus the copy it is stacked from")
    p.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode eagerly on CUDA (debugging)")
    p.add_argument("--prefill-chunk", type=int, default=320, metavar="TOKENS",
                   help="chunked prefill: prompt tokens fed per step beside the decoding rows "
                   "(running requests keep decoding while new prompts go in; default 320); "
                   "0: prefill new prompts whole between decode steps")
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
                             ("--max-adapters", args.max_adapters, 0), ("--port", args.port, 0),
                             ("--prefill-chunk", args.prefill_chunk, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}")
    if args.port > 65535:
        raise UserError(f"--port {args.port}: a port is 0-65535")
    if args.timeout <= 0 or args.adapter_memory_gb < 0:
        raise UserError("--timeout must be positive and --adapter-memory-gb not negative")
    if not args.base and not args.adapters:
        raise UserError("give --base MODEL, --adapters, or both")
    if not (args.api_key or args.insecure_no_api_key or is_loopback(args.host)):
        raise UserError(f"--host {args.host} opens the server to the network, which then may "
                        "generate and load adapters from any path: give --api-key KEY (or "
                        "$LORALAB_API_KEY), or --insecure-no-api-key to serve without one")


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (a name other than localhost counts as not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, taken before the model loads (minutes) so a port in use
    is a one-line error at once; uvicorn then listens on this very socket (no second bind to
    lose in between)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror} (--host, --port)"
                        ) from None
    return sock


def check_device(device: str | None) -> None:
    """--device names a device torch has here (else transformers fails with a traceback)."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device (cuda, cuda:1, cpu ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: this machine has no CUDA device torch can use "
                            f"(torch {torch.__version__}); --device cpu serves on the CPU")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device(s)")


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
    from loralab.serve.registry import adapter_specs, expand

    sock = bind_socket(args.host, args.port)
    try:
        specs = adapter_specs(args.adapters)
        for name, folder in specs:  # every folder checked before the base model loads
            expand(name, folder)
        check_device(args.device)
        state = load_state(args, specs)
    except BaseException:
        sock.close()
        raise
    return serve(args, state, sock)


def load_state(args: argparse.Namespace, specs: list[tuple[str | None, Path]]) -> Any:
    from loralab.model.load import load_base_model
    from loralab.serve.server import ServeOptions, build_state

    cfg = model_config(args.base, specs)
    model, tokenizer = load_base_model(cfg.model, args.device, args.dtype)
    opts = ServeOptions(args.engine, args.max_rows, args.max_len, args.max_queue, args.timeout,
                        args.max_tokens, args.max_adapters, int(args.adapter_memory_gb * 2**30),
                        args.api_key, not args.no_cuda_graph, args.prefill_chunk)
    return build_state(model, tokenizer, args.name or cfg.model.path, cfg.model.path, specs,
                       opts)


def serve(args: argparse.Namespace, state: Any, sock: socket.socket) -> int:
    import uvicorn

    from loralab.serve.app import build_app

    state.scheduler.start()
    models = ", ".join(state.registry.names())
    port = sock.getsockname()[1]  # --port 0: the one the system picked
    print(f"loralab serve: http://{args.host}:{port}/v1 ({args.engine} engine; models: "
          f"{models})", file=sys.stderr, flush=True)
    config = uvicorn.Config(build_app(state), log_level="warning", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        state.scheduler.stop()
    return 0
