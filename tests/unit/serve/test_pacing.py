"""Launching late (serve/pacing.py): the Pacer's estimates and the scheduler's hold before a
launch, which waits for the step in flight to near its end and lets control work through."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from loralab.serve.metrics import Metrics
from loralab.serve.pacing import MARGIN_S, WAITED_S, Pacer
from loralab.serve.scheduler import Flight, Scheduler


def test_no_launch_time_until_two_collects_in_a_row_waited_for_the_gpu():
    pacer = Pacer()
    pacer.launched(0.002)
    assert pacer.launch_at(10.0, True) is None  # no estimate yet
    pacer.collected(True, 0.030, waited=0.020)
    assert pacer.launch_at(10.0, True) is None  # its start (the collect before) is unknown
    pacer.collected(True, 0.030, waited=0.020)
    assert pacer.launch_at(10.0, True) == pytest.approx(10.0 + 0.030 - 0.002 - MARGIN_S)
    assert pacer.launch_at(10.0, False) is None  # no decode step measured
    pacer.collected(True, 0.030, waited=WAITED_S / 2)  # the host was late: launch at once
    assert pacer.launch_at(10.0, True) is None


def test_estimates_follow_each_kind_and_smooth_outliers():
    pacer = Pacer()
    for seconds in (0.010, 0.010, 0.010):
        pacer.collected(False, seconds, waited=0.005)
    pacer.collected(True, 0.030, waited=0.005)
    pacer.collected(True, 0.030, waited=0.005)
    pacer.collected(True, 0.130, waited=0.005)  # one slow step moves it a fifth of the way
    assert pacer.step_s[False] == pytest.approx(0.010)
    assert pacer.step_s[True] == pytest.approx(0.030 + 0.2 * 0.100)


def held_scheduler(hold: bool, step_s: float) -> Scheduler:
    """A scheduler whose Pacer has seen `step_s` mixed steps, with one launched just now."""
    scheduler = Scheduler(SimpleNamespace(), [], 8, Metrics(), hold=hold)
    for _ in range(2):
        scheduler.pacer.collected(True, step_s, waited=0.01)
    now = time.perf_counter()
    scheduler.last_collect = now
    scheduler.flights = [Flight(SimpleNamespace(mixed=True), {}, now)]
    return scheduler


def test_the_hold_lasts_until_near_the_steps_end_through_new_requests():
    scheduler = held_scheduler(True, 0.25)
    started = time.perf_counter()
    threading.Timer(0.05, lambda: scheduler.submit(SimpleNamespace())).start()
    scheduler._hold()
    took = time.perf_counter() - started
    assert 0.25 - MARGIN_S - 0.01 <= took < 0.25 + 0.1
    assert len(scheduler.waiting) == 1  # it arrived during the hold: the launch takes it
    assert scheduler.metrics.hold_seconds == pytest.approx(took, abs=0.01)


def test_control_work_ends_the_hold_and_without_hold_there_is_none():
    scheduler = held_scheduler(True, 5.0)
    threading.Timer(0.05, lambda: scheduler.call(lambda: None)).start()
    started = time.perf_counter()
    scheduler._hold()
    assert time.perf_counter() - started < 1.0
    scheduler = held_scheduler(False, 5.0)
    started = time.perf_counter()
    scheduler._hold()
    assert time.perf_counter() - started < 0.05 and scheduler.metrics.hold_seconds == 0
