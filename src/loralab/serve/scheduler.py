"""The scheduler: one thread drives the continuous batch while requests are queued or running.

Requests wait in a bounded queue (a full queue is a 429 before anything runs). Between steps
the thread runs control work (adapter load/unload), drops cancelled and expired requests, admits
waiting ones into free rows and takes one step; each step's tokens go back to the event loop in
one call, where each request's handler turns them into text. A row leaves the batch as soon as
its request stops, runs out of tokens, times out or its client goes away.

Admission, by `prefill_chunk`: above 0 (the default, 256) an admitted request's row is
prefilling, and while any row is, each step is a mixed step that feeds up to `prefill_chunk`
prompt tokens beside every decoding row's token (the engine's continuous_mixed.py, replayed as
a CUDA graph); a row's first token comes from the step that feeds its prompt's last token. At
0 the waiting requests are prefilled whole before the step (one prefill per length group, its
rows of any adapters and the base), and no row decodes meanwhile. On the H200 both give the
same tokens/s at 64 clients; mixed steps halve the median time to first token (docs/serve.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from loralab.engine.continuous import Sampling

PREFILL_TOKENS = 8192  # prompt tokens prefilled whole per step at most: decode keeps its pace
PREFILL_CHUNK = 256  # prompt tokens a mixed step feeds at most (0: whole prefills instead)
SWITCH_INTERVAL_S = 0.0005  # the process's GIL switch interval while serving
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


def emit(batch: list[tuple[Request, tuple]]) -> None:
    """Deliver (request, event) pairs; runs in the event loop."""
    for req, event in batch:
        req.events.put_nowait(event)


class Scheduler:
    """Drives a ContinuousBatch from one background thread."""

    def __init__(self, batch: Any, stop_ids: list[int], max_queue: int, metrics: Any,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        self.batch, self.stop_ids = batch, set(stop_ids)
        self.max_queue, self.metrics = max_queue, metrics
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}
        self.control: collections.deque[tuple[Any, Future]] = collections.deque()
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="loralab-scheduler", daemon=True)

    def start(self) -> None:
        # The HTTP thread and this one share the GIL; with Python's default 5 ms switch
        # interval a decode step ready to launch could wait that long behind the HTTP work.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------ from the event loop

    def submit(self, req: Request) -> bool:
        """Queue `req`; False when the queue is full (the caller answers 429)."""
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(req)
            self.wake.notify()
        return True

    def cancel(self, req: Request) -> None:
        """The request's client is gone or it already has its answer: free its row."""
        req.cancelled = True
        with self.wake:
            self.wake.notify()

    def call(self, fn: Any) -> Future:
        """Run fn() in the scheduler thread between two steps (it may touch the batch)."""
        future: Future = Future()
        with self.wake:
            self.control.append((fn, future))
            self.wake.notify()
        return future

    def queue_length(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------ the thread

    def _next_work(self, busy: bool) -> bool:
        """Wait until there is work (or, when `busy`, go on at once) and run the waiting
        control calls; False once the server stops."""
        with self.wake:
            while not (self.stopped or self.waiting or self.control or busy):
                self.wake.wait()
            if self.stopped:
                return False
            control = list(self.control)
            self.control.clear()
        for fn, future in control:
            try:
                future.set_result(fn())
            except Exception as exc:  # the caller reports it; the server goes on
                future.set_exception(exc)
        return True

    def _loop(self) -> None:
        while self._next_work(busy=bool(self.running)):
            out: list[tuple[Request, tuple]] = []
            try:
                self._drop_finished(out)
                self._admit(out)
                self._step(out)
            except Exception as exc:  # a bug of ours: fail what is in flight, keep serving
                self._send(out)
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}"[:300], 500)
                continue
            if out:
                self._send(out)
        self._fail_all("the server is shutting down", 503)

    def _send(self, out: list[tuple[Request, tuple]]) -> None:
        loops: dict[Any, list] = {}
        for req, event in out:
            loops.setdefault(req.loop, []).append((req, event))
        for loop, events in loops.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(emit, events)

    def _drop_finished(self, out: list) -> None:
        """Free the rows of cancelled and expired requests; expire waiting ones too."""
        now = time.monotonic()
        for row, req in list(self.running.items()):
            if req.cancelled or now > req.deadline:
                self._finish(row, req, out, None if req.cancelled else "timeout")
        with self.wake:
            keep = collections.deque()
            for req in self.waiting:
                if req.cancelled:
                    self.metrics.finished(req, "cancelled")
                elif now > req.deadline:
                    out.append((req, ("error", 504, "the request timed out in the queue")))
                    self.metrics.finished(req, "timeout")
                else:
                    keep.append(req)
            self.waiting = keep

    def _finish(self, row: int, req: Request, out: list, reason: str | None) -> None:
        """The row leaves; reason None: cancelled (nobody to tell), else the finish event."""
        self.batch.free(row)
        del self.running[row]
        if reason == "timeout":
            out.append((req, ("error", 504, "the request timed out")))
        elif reason is not None:
            out.append((req, ("done", reason)))
        self.metrics.finished(req, reason or ("stop" if req.stopped_by_text else "cancelled"))

    def _take(self) -> list[Request]:
        """Waiting requests that fit the free rows (and, prefilled whole, this step's prefill
        budget: chunked rows are fed by the steps' own budget)."""
        taken, tokens = [], 0
        with self.wake:
            while self.waiting and len(taken) < len(self.batch.free_rows):
                n = len(self.waiting[0].prompt_ids)
                if taken and not self.prefill_chunk and tokens + n > PREFILL_TOKENS:
                    break
                taken.append(self.waiting.popleft())
                tokens += n
        return taken

    def _admit(self, out: list) -> None:
        if self.prefill_chunk:
            self._begin(out)
            return
        for group in prefill_groups(self._take(), self.batch.max_len):
            group = self._loaded(group, out)
            if not group:
                continue
            started = time.perf_counter()
            try:
                rows, firsts = self.batch.add([r.prompt_ids for r in group],
                                              [r.adapter for r in group],
                                              [r.sampling for r in group])
                self.metrics.prefill(time.perf_counter() - started)
            except Exception as exc:  # this group fails with a 500; the others go on
                for req in group:
                    self._engine_failed(req, exc, out)
                continue
            now = time.monotonic()
            for row, first, req in zip(rows, firsts, group, strict=True):
                self.running[row] = req
                self._first_token(req, now)
                self._token(row, req, first, out)
            for model, n in collections.Counter(r.model for r in group).items():
                self.metrics.tokens(model, n)

    def _begin(self, out: list) -> None:
        """Admitted requests become prefilling rows: nothing runs until the next step."""
        for req in self._loaded(self._take(), out):
            try:
                row = self.batch.begin(req.prompt_ids, req.adapter, req.sampling)
            except Exception as exc:  # this request fails with a 500; the others go on
                self._engine_failed(req, exc, out)
                continue
            self.running[row] = req

    def _loaded(self, group: list[Request], out: list) -> list[Request]:
        """The group's requests whose adapter is still loaded. The others were unloaded between
        the request naming the adapter and its submission (the unload ran on this thread then,
        and its queue sweep missed them): 409, as for the others."""
        keep = []
        for req in group:
            if req.adapter and req.adapter not in self.batch.loras:
                out.append((req, ("error", 409, unloaded_message(req.model))))
                self.metrics.finished(req, "unloaded")
            else:
                keep.append(req)
        return keep

    def _engine_failed(self, req: Request, exc: Exception, out: list) -> None:
        """The request fails with a 500 naming the engine's error (it holds no row)."""
        out.append((req, engine_error(exc)))
        self.metrics.finished(req, "error")

    def _first_token(self, req: Request, now: float) -> None:
        req.first_token_at = now
        self.metrics.first_token(req, now - req.arrived)

    def _token(self, row: int, req: Request, token: int, out: list) -> None:
        """Pass a token on; finish the row on a stop token, max_tokens or a full cache row."""
        req.generated += 1
        out.append((req, ("tokens", [token])))
        if token in self.stop_ids:
            self._finish(row, req, out, "stop")
        elif req.generated >= req.max_tokens or self.batch.room(row) <= 0:
            self._finish(row, req, out, "length")

    def _step(self, out: list) -> None:
        if not self.running:
            return
        pending, started = self.batch.pending_tokens(), time.perf_counter()
        try:
            tokens = self.batch.step(self.prefill_chunk or 1)
        except Exception as exc:  # fail the running requests with a 500, keep serving
            for row, req in list(self.running.items()):
                self.batch.free(row)
                del self.running[row]
                self._engine_failed(req, exc, out)
            return
        seconds, now = time.perf_counter() - started, time.monotonic()
        mine = {row: (self.running[row], token) for row, token in tokens.items()
                if row in self.running}
        firsts = {row for row, (req, _) in mine.items() if req.first_token_at is None}
        if pending:  # a mixed step: the prompt tokens it fed, the decode rows that rode along
            self.metrics.mixed_step(pending - self.batch.pending_tokens(),
                                    len(tokens) - len(firsts), seconds)
        else:
            self.metrics.step(len(tokens), seconds)
        per_model: collections.Counter[str] = collections.Counter()
        for row, (req, token) in mine.items():
            if row in firsts:  # the step fed its prompt's last chunk
                self._first_token(req, now)
            per_model[req.model] += 1
            self._token(row, req, token, out)
        for model, n in per_model.items():
            self.metrics.tokens(model, n)

    def fail_adapter(self, adapter: int, message: str) -> None:
        """Fail the requests of an adapter being unloaded (409); scheduler thread only."""
        out: list[tuple[Request, tuple]] = []
        for row, req in list(self.running.items()):
            if req.adapter == adapter:
                self.batch.free(row)
                del self.running[row]
                out.append((req, ("error", 409, message)))
                self.metrics.finished(req, "unloaded")
        with self.wake:
            for req in [r for r in self.waiting if r.adapter == adapter]:
                self.waiting.remove(req)
                out.append((req, ("error", 409, message)))
                self.metrics.finished(req, "unloaded")
        self._send(out)

    def _fail_all(self, message: str, status: int) -> None:
        out = []
        for row, req in list(self.running.items()):
            self.batch.free(row)
            out.append((req, ("error", status, message)))
        self.running.clear()
        with self.wake:
            out += [(req, ("error", status, message)) for req in self.waiting]
            self.waiting.clear()
        self._send(out)


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
