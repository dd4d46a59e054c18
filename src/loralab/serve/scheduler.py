"""The scheduler: one thread drives the continuous batch while requests are queued or running.

Requests wait in a bounded queue (a full queue is a 429 before anything runs). Between steps
the thread runs control work (adapter load/unload), drops cancelled and expired requests, admits
waiting ones into free rows and takes one step; each step's tokens go back to the event loop in
one call, where each request's handler turns them into text. A row leaves the batch as soon as
its request stops, runs out of tokens, times out or its client goes away.

Steps overlap the host's work (async scheduling, as vLLM does it): each turn launches step k+1
(the engine's launch(): planned and queued on the GPU, not waited for) before it collects step
k's tokens and hands them out, so the GPU runs step k+1 while the host works on step k's
tokens and the next turn's admissions. So the host decides what step k+1 runs before it has
seen step k's tokens. A request whose last token (max_tokens, or its row's cache is full) is in
step k leaves the batch before step k+1 is launched, and gets that token when step k is
collected. One that stops on a stop token in step k was already in step k+1: that step's token
for it is dropped (the row may hold a new request by then: each launched step remembers whose
its rows were). At most one step is left in flight between turns; control work and whole
prefills (add(), which waits for the GPU anyway) collect it first. While the GPU sets the pace,
a turn holds its launch until shortly before the step in flight should end (pacing.py), so a
request that arrives meanwhile (a client asking again as soon as it has its last token) joins
the next step instead of the one after.

Admission, by `prefill_chunk`: above 0 (the default, 320) an admitted request's row is
prefilling, and while any row is, each step is a mixed step that feeds up to `prefill_chunk`
prompt tokens beside every decoding row's token (the engine's continuous_mixed.py, replayed as
a CUDA graph); a row's first token comes from the step that feeds its prompt's last token. At
0 the waiting requests are prefilled whole before the step (one prefill per length group, its
rows of any adapters and the base), and no row decodes meanwhile. On the H200 at 64 clients
mixed steps with the overlap and held launches give 4,155-4,249 new tokens/s against 2,816 for
whole prefills before them, and a median time to first token of 0.041 s against 0.49 s
(docs/serve.md).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from loralab.engine.continuous import PREFILL_CHUNK  # the engine's step budget, also ours
from loralab.serve.pacing import Pacer, wait_until
from loralab.serve.request import Request, emit, engine_error, prefill_groups, unloaded_message

__all__ = ["Flight", "Request", "Scheduler", "emit", "engine_error", "prefill_groups",
           "unloaded_message"]

PREFILL_TOKENS = 8192  # prompt tokens prefilled whole per step at most: decode keeps its pace
SWITCH_INTERVAL_S = 0.0005  # the process's GIL switch interval while serving


@dataclass
class Flight:
    """A launched step not collected yet: the engine's handle, and each of its rows' request
    at the launch (by the collect, a row may hold another one)."""

    pending: Any
    owners: dict[int, Request]
    launched: float  # time.perf_counter() at the launch


class Scheduler:
    """Drives a ContinuousBatch from one background thread."""

    def __init__(self, batch: Any, stop_ids: list[int], max_queue: int, metrics: Any,
                 prefill_chunk: int = PREFILL_CHUNK, hold: bool = True) -> None:
        self.batch, self.stop_ids = batch, set(stop_ids)
        self.hold, self.pacer = hold, Pacer()  # hold: launch late (pacing.py)
        self.max_queue, self.metrics = max_queue, metrics
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}  # the batch's busy rows
        self.flights: list[Flight] = []  # launched steps not collected yet, oldest first
        self.last_collect = 0.0
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
        control calls, once no step is in flight (an adapter swap drops the graphs a launched
        step replays); False once the server stops."""
        with self.wake:
            while not (self.stopped or self.waiting or self.control or busy):
                self.wake.wait()
            if self.stopped:
                return False
            control = list(self.control)
            self.control.clear()
        if control and self.flights:
            self._guarded(self._drain)
        for fn, future in control:
            try:
                future.set_result(fn())
            except Exception as exc:  # the caller reports it; the server goes on
                future.set_exception(exc)
        return True

    def _loop(self) -> None:
        while self._next_work(busy=bool(self.running or self.flights)):
            self._guarded(self._turn)
        self._fail_all("the server is shutting down", 503)

    def _guarded(self, work: Any) -> None:
        """work(out), then its events sent."""
        out: list[tuple[Request, tuple]] = []
        try:
            work(out)
        except Exception as exc:  # a bug of ours: fail what is in flight, keep serving
            self._send(out)
            self._fail_all(f"internal error: {type(exc).__name__}: {exc}"[:300], 500)
            return
        if out:
            self._send(out)

    def _turn(self, out: list) -> None:
        """One turn of the loop: drop, admit, launch the next step, then collect the one that
        was in flight, so the GPU runs the new step while the host hands out the old one's
        tokens (and, next turn, admits and plans)."""
        self._hold()
        self._drop_finished(out)
        self._admit(out)
        in_flight = len(self.flights)
        self._launch(out)
        for _ in range(in_flight):  # fewer when the launch failed: it forgot them all
            self._collect(out)

    def _hold(self) -> None:
        """With `hold`: wait until shortly before the step in flight ends on the GPU
        (pacing.py), so the requests that arrive meanwhile join the next step; control work or
        a stop ends the wait at once."""
        if self.hold and self.flights:
            flight = self.flights[-1]
            until = self.pacer.launch_at(max(self.last_collect, flight.launched),
                                         flight.pending.mixed)
            if until is not None:
                self.metrics.held(wait_until(self.wake, until,
                                             lambda: self.stopped or bool(self.control)))

    def _step(self, out: list) -> None:
        """One step from launch to its tokens handed out, nothing left in flight (the loop's
        turn without the overlap)."""
        self._drain(out)
        self._launch(out)
        self._drain(out)

    def _drain(self, out: list) -> None:
        """Collect every step in flight."""
        while self.flights:
            self._collect(out)

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
        """The request ends and its row leaves (unless it left already: see _retire); reason
        None: cancelled (nobody to tell), else the finish event."""
        if self.running.get(row) is req:
            self.batch.free(row)
            del self.running[row]
        req.finished = True
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
        taken = self._take()
        if taken:  # add() waits for the GPU anyway: the step in flight is collected first
            self._drain(out)
        for group in prefill_groups(taken, self.batch.max_len):
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
        req.finished = True
        out.append((req, engine_error(exc)))
        self.metrics.finished(req, "error")

    def _engine_down(self, exc: Exception, out: list) -> None:
        """A step failed to launch or collect: every request with a row or a token in flight
        fails with a 500, their rows are freed and the launched steps forgotten; the server
        goes on."""
        for req in self._forget_all():
            self._engine_failed(req, exc, out)

    def _forget_all(self) -> list[Request]:
        """Free every row, forget the steps in flight; the unfinished requests that had a row
        or a token in flight, each once."""
        reqs = {id(r): r for f in self.flights for r in f.owners.values()}
        reqs.update((id(r), r) for r in self.running.values())
        for row in list(self.running):
            self.batch.free(row)
        self.running.clear()
        self.flights.clear()
        return [r for r in reqs.values() if not r.finished]

    def _first_token(self, req: Request, now: float) -> None:
        req.first_token_at = now
        self.metrics.first_token(req, now - req.arrived)

    def _token(self, row: int, req: Request, token: int, out: list) -> None:
        """Pass a token on; finish the row on a stop token, max_tokens or a full cache row
        (counted when none of its tokens is in flight; else _retire sees to it), or when the
        row left already because this was its last token."""
        req.generated += 1
        out.append((req, ("tokens", [token])))
        if token in self.stop_ids:
            self._finish(row, req, out, "stop")
        elif (req.generated >= req.max_tokens or self.running.get(row) is not req
              or (not req.in_flight and self.batch.room(row) <= 0)):
            self._finish(row, req, out, "length")

    def _retire(self, out: list) -> None:
        """Before a launch: a row whose request has its last token in flight already
        (max_tokens) or whose cache row is full leaves the batch, so the step does not run it
        past either; its request ends when that token is collected (now, if none is)."""
        for row, req in list(self.running.items()):
            if (req.generated + req.in_flight >= req.max_tokens
                    or self.batch.room(row) <= 0):
                self.batch.free(row)
                del self.running[row]
                if not req.in_flight:
                    self._finish(row, req, out, "length")

    def _launch(self, out: list) -> None:
        """Launch the next step of the running rows (none: nothing to do); not waited for."""
        self._retire(out)
        if not self.running:
            return
        started = time.perf_counter()
        try:
            pending = self.batch.launch(self.prefill_chunk or 1)
        except Exception as exc:  # fail what is in flight with a 500, keep serving
            self._engine_down(exc, out)
            return
        took = time.perf_counter() - started
        self.metrics.launched(took)
        self.pacer.launched(took)
        owners = {row: self.running[row] for row in pending.rows}
        for req in owners.values():
            req.in_flight += 1
        self.flights.append(Flight(pending, owners, time.perf_counter()))

    def _collect(self, out: list) -> None:
        """Collect the oldest step in flight and hand its tokens to the requests that still
        own them (a token for a request that has finished since the launch is dropped). The
        step's time: from its launch, or the previous collect if later, to its collect."""
        if not self.flights:
            return
        flight = self.flights.pop(0)
        waiting = time.perf_counter()
        try:
            tokens = self.batch.collect(flight.pending)
        except Exception as exc:  # fail what is in flight with a 500, keep serving
            self.flights.insert(0, flight)
            self._engine_down(exc, out)
            return
        collected, now = time.perf_counter(), time.monotonic()
        self.metrics.collect_wait(collected - waiting)
        seconds = collected - max(flight.launched, self.last_collect)
        self.pacer.collected(flight.pending.mixed, seconds, collected - waiting)
        self.last_collect = collected
        mine = {}
        for row, token in tokens.items():
            req = flight.owners[row]
            req.in_flight -= 1
            if not req.finished:
                mine[row] = (req, token)
        firsts = {row for row, (req, _) in mine.items() if req.first_token_at is None}
        if flight.pending.mixed:  # the prompt tokens it fed, the decode rows that rode along
            self.metrics.mixed_step(flight.pending.prompt_tokens, len(mine) - len(firsts),
                                    seconds)
        else:
            self.metrics.step(len(mine), seconds)
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
        self._drain(out)  # a no-op from a control call: the loop drained before it
        for row, req in list(self.running.items()):
            if req.adapter == adapter:
                self.batch.free(row)
                del self.running[row]
                req.finished = True
                out.append((req, ("error", 409, message)))
                self.metrics.finished(req, "unloaded")
        with self.wake:
            for req in [r for r in self.waiting if r.adapter == adapter]:
                self.waiting.remove(req)
                out.append((req, ("error", 409, message)))
                self.metrics.finished(req, "unloaded")
        self._send(out)

    def _fail_all(self, message: str, status: int) -> None:
        """Fail every request with a row, a token in flight or waiting (steps in flight are
        not collected: their tokens would go nowhere)."""
        out = []
        for req in self._forget_all():
            req.finished = True
            out.append((req, ("error", status, message)))
        with self.wake:
            out += [(req, ("error", status, message)) for req in self.waiting]
            self.waiting.clear()
        self._send(out)
