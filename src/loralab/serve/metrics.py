"""Server counters in Prometheus' text format (GET /metrics): requests by model and outcome,
tokens, tokens/s over the last few seconds, queue length, batch size, time to first token, and
the engine's steps: decode steps, whole prefills and mixed steps (chunked prefill), each with
its time.

A step's time is wall time on the scheduler thread, from the step's launch (or the previous
step's collect, if later: the scheduler launches a step before it collects the one before) to
its collect. With steps back to back that is the time between two collects, what a step costs
the loop; it is not the GPU's time (it includes any wait of the GPU for the host), so the
steps' time over a window is the time a step was in flight, not the GPU's busy time."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

WINDOW_S = 10.0  # tokens/s is measured over this many seconds

# Engine counters exposed as unlabelled Prometheus counters: (name, help, attribute).
SCALAR_COUNTERS = (
    ("decode_steps_total", "Decode steps taken (no prompt tokens).", "steps"),
    ("decode_step_seconds_total", "Wall time of decode steps, each from its launch (or the "
     "previous step's collect, if later) to its collect.", "step_seconds"),
    ("mixed_steps_total", "Mixed steps: chunks of prompts beside the decoding rows' tokens.",
     "mixed_steps"),
    ("mixed_step_seconds_total", "Wall time of mixed steps, each from its launch (or the "
     "previous step's collect, if later) to its collect.", "mixed_seconds"),
    ("mixed_step_prompt_tokens_total", "Prompt tokens fed by mixed steps.", "mixed_prompt_tokens"),
    ("mixed_step_decode_rows_total", "Decoding rows' tokens in mixed steps.", "mixed_decode_rows"),
    ("prefills_total", "Prefill calls (a group of new rows each).", "prefills"),
    ("prefill_seconds_total", "Time in prefills.", "prefill_seconds"),
    ("collect_wait_seconds_total", "Time the scheduler waited for a step's tokens (the GPU "
     "still working); the rest of its time is host work. Near 0 under load: the host is what "
     "limits the steps.", "collect_wait_seconds"),
    ("launch_seconds_total", "Host time in the engine's launch() (planning a step and queueing "
     "it on the GPU).", "launch_seconds"),
    ("hold_seconds_total", "Time the scheduler held the next launch back while the GPU still "
     "ran the step before it, admitting requests that arrived meanwhile.", "hold_seconds"),
)


class Metrics:
    """Thread-safe counters: the scheduler thread writes, the event loop reads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.generated: collections.Counter[str] = collections.Counter()
        self.prompt_tokens: collections.Counter[str] = collections.Counter()
        self.steps, self.step_seconds, self.step_rows = 0, 0.0, 0  # decode steps
        # mixed steps: prompt tokens fed, decode rows that rode along (first tokens not counted)
        self.mixed_steps, self.mixed_seconds = 0, 0.0
        self.mixed_prompt_tokens, self.mixed_decode_rows = 0, 0
        self.prefills, self.prefill_seconds = 0, 0.0
        self.collect_wait_seconds = 0.0
        self.launch_seconds = self.hold_seconds = 0.0
        self.last_batch = 0
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()

    def received(self, model: str, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens[model] += prompt_tokens

    def rejected(self, model: str, outcome: str) -> None:
        with self.lock:
            self.requests[(model, outcome)] += 1

    def finished(self, req: Any, outcome: str) -> None:
        self.rejected(req.model, outcome)

    def tokens(self, model: str, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generated[model] += n
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - WINDOW_S:
                self.recent.popleft()

    def first_token(self, req: Any, seconds: float) -> None:
        with self.lock:
            self.ttft_sum += seconds
            self.ttft_count += 1

    def prefill(self, seconds: float) -> None:
        with self.lock:
            self.prefills += 1
            self.prefill_seconds += seconds

    def collect_wait(self, seconds: float) -> None:
        """The scheduler waited `seconds` for a launched step's tokens."""
        with self.lock:
            self.collect_wait_seconds += seconds

    def launched(self, seconds: float) -> None:
        """A launch() took `seconds` of the scheduler's time."""
        with self.lock:
            self.launch_seconds += seconds

    def held(self, seconds: float) -> None:
        """The scheduler held a launch back `seconds` (see Scheduler._hold)."""
        with self.lock:
            self.hold_seconds += seconds

    def step(self, rows: int, seconds: float) -> None:
        """A decode step that gave `rows` requests a token (tokens dropped for requests that
        ended while it ran not counted), `seconds` as in the module's docstring."""
        with self.lock:
            self.steps += 1
            self.step_seconds += seconds
            self.step_rows += rows
            self.last_batch = rows

    def mixed_step(self, prompt_tokens: int, decode_rows: int, seconds: float) -> None:
        """A mixed step: `prompt_tokens` fed beside `decode_rows` decoding rows' tokens (as in
        step(), tokens dropped not counted)."""
        with self.lock:
            self.mixed_steps += 1
            self.mixed_seconds += seconds
            self.mixed_prompt_tokens += prompt_tokens
            self.mixed_decode_rows += decode_rows
            self.last_batch = decode_rows

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self.lock:
            total = sum(n for t, n in self.recent if t >= now - WINDOW_S)
        span = min(WINDOW_S, max(now - (self.recent[0][0] if self.recent else now), 1e-9))
        return total / span if total else 0.0

    def render(self, queue_length: int, running: int, adapters: int) -> str:
        """The Prometheus exposition text."""
        rate = self.tokens_per_s()
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP loralab_{name} {help_}")
            lines.append(f"# TYPE loralab_{name} {kind}")
            lines.extend(f"loralab_{name}{labels} {value:g}" for labels, value in samples)

        with self.lock:
            metric("requests_total", "counter", "Finished requests by model and outcome.",
                   [(f'{{model="{_esc(m)}",outcome="{o}"}}', n)
                    for (m, o), n in sorted(self.requests.items())])
            metric("generation_tokens_total", "counter", "New tokens by model.",
                   [(f'{{model="{_esc(m)}"}}', n) for m, n in sorted(self.generated.items())])
            metric("prompt_tokens_total", "counter", "Prompt tokens by model.",
                   [(f'{{model="{_esc(m)}"}}', n)
                    for m, n in sorted(self.prompt_tokens.items())])
            for name, help_text, attr in SCALAR_COUNTERS:
                metric(name, "counter", help_text, [("", getattr(self, attr))])
            metric("time_to_first_token_seconds_sum", "counter",
                   "Sum of times from arrival to first token.", [("", self.ttft_sum)])
            metric("time_to_first_token_seconds_count", "counter",
                   "Requests that got a first token.", [("", self.ttft_count)])
            metric("batch_size", "gauge", "Decoding rows in the last step.",
                   [("", self.last_batch)])
        metric("generation_tokens_per_second", "gauge",
               f"New tokens per second over the last {WINDOW_S:g} s.", [("", rate)])
        metric("queue_length", "gauge", "Requests waiting for a row.", [("", queue_length)])
        metric("running_requests", "gauge", "Requests decoding now.", [("", running)])
        metric("adapters_loaded", "gauge", "Adapters loaded.", [("", adapters)])
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
