"""What the scheduler schedules: a request, and the helpers around it that need no scheduler
(its events' delivery, the engine-error event, whole-prefill groups)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from loralab.engine.continuous import Sampling

GROUP_SPREAD = 1.5  # prompts prefilled together pad to at most this × the shortest


@dataclass
class Request:
    """One generation: what to run, where its events go, and how it ended."""

    prompt_ids: list[int]
    model: str  # the base model's name or an adapter's
    adapter: int  # adapter id in the engine, 0 for the base
    max_tokens: int
    sampling: Sampling
    deadline: float  # time.monotonic() after which it fails with a timeout
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    stopped_by_text: bool = False  # cancelled because its text reached a `stop` string
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generated: int = 0
    last_token: int | None = None
    in_flight: int = 0  # its tokens in launched steps not collected yet
    finished: bool = False  # its last event is sent: tokens still in flight are dropped


def emit(batch: list[tuple[Request, tuple]]) -> None:
    """Deliver (request, event) pairs; runs in the event loop."""
    for req, event in batch:
        req.events.put_nowait(event)


def engine_error(exc: Exception) -> tuple:
    """The event that fails a request with a 500 for an error of the engine."""
    return ("error", 500, f"engine error: {type(exc).__name__}: {exc}"[:300])


def unloaded_message(model: str) -> str:
    return f"the adapter {model!r} was unloaded"


def prefill_groups(requests: list[Request], max_len: int) -> list[list[Request]]:
    """Requests grouped for one prefill each, whatever their adapters (the engine masks each
    row's own): lengths within GROUP_SPREAD of the group's shortest, and every row's tokens
    still fit the cache after padding."""
    groups: list[list[Request]] = []
    group: list[Request] = []
    for req in sorted(requests, key=lambda r: len(r.prompt_ids)):
        width = len(req.prompt_ids)
        fits = group and width <= GROUP_SPREAD * len(group[0].prompt_ids) and all(
            width + r.max_tokens <= max_len for r in [*group, req])
        if group and not fits:
            groups.append(group)
            group = []
        group.append(req)
    if group:
        groups.append(group)
    return groups
