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
        from loralab.engine.continuous import ContinuousBatch
        from loralab.serve.scheduler import Scheduler

        batch = ContinuousBatch(model, opts.max_rows, opts.max_len, opts.cuda_graph)
        backend = BatchAdapters(batch)
        scheduler = Scheduler(batch, stop_ids, opts.max_queue, metrics)
    registry = Registry(base_name, base_path, backend, scheduler, opts.max_adapters,
                        opts.adapter_memory_bytes)
    for name, folder in adapters:
        registry.add_now(registry.prepare(name, folder))
    return ServerState(tokenizer, scheduler, registry, metrics, stop_ids, opts.max_len,
                       opts.default_max_tokens, opts.timeout_s, opts.api_key, opts.engine)


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
