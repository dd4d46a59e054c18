"""Putting a server together around a loaded model (the CLI, the tests and the benchmark), and
running it in a thread (tests, the benchmark)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ServeOptions:
    engine: str = "continuous"  # or "naive": HF generate per request, one at a time
    max_rows: int = 64
    max_len: int = 2048
    max_queue: int = 256
    timeout_s: float = 600.0
    default_max_tokens: int = 512
    max_adapters: int = 16
    adapter_memory_bytes: int = 4 << 30
    api_key: str | None = None
    cuda_graph: bool = True
    prefill_chunk: int = 320  # prompt tokens a mixed step feeds; 0: whole prefills (scheduler)


def build_state(model: Any, tokenizer: Any, base_name: str, base_path: str,
                adapters: list[tuple[str | None, Path]], opts: ServeOptions) -> Any:
    """The ServerState (scheduler not started yet) with `adapters` loaded. UserError when
    an adapter cannot be served or the continuous engine cannot run the model."""
    from loralab.engine.api import stop_token_ids
    from loralab.serve.app import ServerState
    from loralab.serve.metrics import Metrics
    from loralab.serve.registry import BatchAdapters, Registry

    metrics = Metrics()
    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    if opts.engine == "naive":
        from loralab.serve.naive import NaiveAdapters, NaiveScheduler

        backend = NaiveAdapters(model)
        scheduler = NaiveScheduler(backend, pad_id, stop_ids, opts.max_queue, metrics)
    else:
        from loralab.serve.scheduler import Scheduler

        batch = make_batch(model, opts)
        backend = BatchAdapters(batch)
        scheduler = Scheduler(batch, stop_ids, opts.max_queue, metrics, opts.prefill_chunk)
    registry = Registry(base_name, base_path, backend, scheduler, opts.max_adapters,
                        opts.adapter_memory_bytes)
    for name, folder in adapters:
        registry.add_now(registry.prepare(name, folder))
    return ServerState(tokenizer, scheduler, registry, metrics, stop_ids, opts.max_len,
                       opts.default_max_tokens, opts.timeout_s, opts.api_key, opts.engine)


def make_batch(model: Any, opts: ServeOptions) -> Any:
    """The ContinuousBatch, or a UserError naming --max-rows/--max-len when its KV cache does
    not fit: checked against the free memory first (on the CPU an allocation too large is not
    an error but the kernel's OOM killer, later), the allocation's own error caught too."""
    import torch

    from loralab.engine.continuous import ContinuousBatch, cache_bytes
    from loralab.errors import UserError

    need = cache_bytes(model, opts.max_rows, opts.max_len)
    device = next(model.parameters()).device
    free = free_memory(device)

    def too_big(have: str) -> UserError:
        return UserError(f"the KV cache of --max-rows {opts.max_rows} x --max-len "
                         f"{opts.max_len} needs {need / 2**30:,.1f} GiB, {have} on {device}: "
                         "lower --max-rows or --max-len")

    if free is not None and need > free:
        raise too_big(f"more than the {free / 2**30:,.1f} GiB free")
    try:
        return ContinuousBatch(model, opts.max_rows, opts.max_len, opts.cuda_graph)
    except torch.OutOfMemoryError:
        raise too_big("more than could be allocated") from None
    except RuntimeError as exc:  # the CPU allocator's failure is a plain RuntimeError
        if "allocate" not in str(exc):
            raise
        raise too_big("more than could be allocated") from None


def free_memory(device: Any) -> int | None:
    """Bytes free on `device` now (None: unknown): CUDA's own count, on the CPU the kernel's
    MemAvailable."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RunningServer:
    """uvicorn serving `app` from a thread on host:port (port 0: a free one)."""

    def __init__(self, state: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        from loralab.serve.app import build_app

        self.state = state
        config = uvicorn.Config(build_app(state), host=host, port=port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="loralab-http", daemon=True)

    def __enter__(self) -> RunningServer:
        self.state.scheduler.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.scheduler.stop()
