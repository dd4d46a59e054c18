"""When to launch the next step: as late as the GPU allows, so that requests arriving while a
step runs join the next one.

The scheduler launches step k+1 before it collects step k (scheduler.py), so the GPU always has
the next step queued. Launched at once, step k+1 holds the requests that were waiting when step
k's tokens came back; one arriving a few milliseconds later (a client that just got its last
token and asks again) waits a whole step for the launch after, and its row idles meanwhile. A
Pacer estimates when the step in flight ends on the GPU (its start: the collect before it
returned, since that collect had to wait for the GPU; its length: recent steps of its kind) and
gives the time to launch the next one: that end, less the time a launch takes and a margin.
While the host is the slower side (collects find their step done), it gives no time: launch
at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

MARGIN_S = 0.003  # a held launch is queued this long before the step in flight should end
WAITED_S = 0.0002  # a collect that took longer waited for the GPU (a done event is ~10 µs)
SMOOTHING = 0.2  # weight of the newest measurement in the running estimates


class Pacer:
    """Running estimates of a step's device time (per kind: mixed or decode) and of launch()'s
    host time, and from them the time to launch the next step."""

    def __init__(self) -> None:
        self.step_s: dict[bool, float] = {}  # mixed? -> seconds a step of that kind runs
        self.launch_s = 0.0
        self.waited = False  # the last collect waited for the GPU: its step ended as it returned

    def launched(self, seconds: float) -> None:
        """A launch() took `seconds` of host time."""
        self.launch_s = _smooth(self.launch_s or seconds, seconds)

    def collected(self, mixed: bool, seconds: float, waited: float) -> None:
        """A collect waited `waited` seconds for a step of `seconds` (from its start on the
        GPU, as far as the host can tell: its launch or the collect before, if later)."""
        was_waiting, self.waited = self.waited, waited > WAITED_S
        if was_waiting and self.waited:  # it started as the step before ended, and just ended
            self.step_s[mixed] = _smooth(self.step_s.get(mixed, seconds), seconds)

    def launch_at(self, started: float, mixed: bool) -> float | None:
        """perf_counter() time to launch the step after the one in flight (of kind `mixed`,
        running on the GPU since `started`), or None: launch now (the host sets the pace, or
        no estimate yet)."""
        if not self.waited or mixed not in self.step_s:
            return None
        return started + self.step_s[mixed] - self.launch_s - MARGIN_S


def wait_until(wake: Any, until: float, interrupted: Callable[[], bool]) -> float:
    """Wait on the threading.Condition `wake` until perf_counter() reaches `until`, or until
    interrupted() holds at a wake-up (checked under the condition's lock); the seconds waited.
    A notify for anything else (a new request) waits on."""
    started = time.perf_counter()
    with wake:
        while not interrupted():
            left = until - time.perf_counter()
            if left <= 0:
                break
            wake.wait(left)
    return time.perf_counter() - started


def _smooth(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new
