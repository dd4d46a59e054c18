"""CUDA graphs for the continuous batch's steps: one graph per (kind, attention-length bucket),
kind "decode" (continuous.py) or "mixed" (continuous_mixed.py).

A step's body reads and writes only tensors the batch owns (its per-step inputs are copied into
preallocated device buffers before it runs) and never waits on the host, so one capture serves
every later step of its bucket: a replay launches the whole step at once instead of ~50 small
kernels per layer from Python.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

WARMUP = 2  # eager steps before a capture (allocator pools and lazy inits settle in them)


def run_step(batch: Any, key: tuple[str, int], body: Callable[[], None]) -> None:
    """body() eagerly, or on CUDA: WARMUP eager steps (real steps), then a graph captured for
    `key` and replayed from then on. A capture error leaves `key` eager for good and is kept in
    batch.stats["graph_error"]."""
    import torch

    if not batch.use_graph:
        body()
        return
    entry = batch.graphs.setdefault(key, {"n": 0, "graph": None})
    if entry["graph"] is not None:
        entry["graph"].replay()
        return
    entry["n"] += 1
    stream = torch.cuda.current_stream(batch.device)
    side = torch.cuda.Stream(batch.device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        body()
    stream.wait_stream(side)
    if entry["n"] < WARMUP:
        return
    graph, started = torch.cuda.CUDAGraph(), time.perf_counter()
    try:
        # capture records without running: the eager call above was this step
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            body()
    except Exception as exc:  # an op that cannot be captured: stay eager for this key
        batch.stats["graph_error"] = f"{key[0]}: {type(exc).__name__}: {exc}"[:300]
        entry["n"] = -(10**9)
        return
    entry["graph"] = graph
    batch.stats["captures"] += 1
    batch.stats["capture_seconds"] += time.perf_counter() - started


def drop_graphs(batch: Any, kind: str | None = None) -> None:
    """Forget the captured graphs of `kind` (all kinds: None); the next steps capture anew."""
    for key in [k for k in batch.graphs if kind is None or k[0] == kind]:
        del batch.graphs[key]
