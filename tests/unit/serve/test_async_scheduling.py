"""The scheduler's overlapped loop (each turn launches step k+1, then collects step k): every
request gets the events it gets from one step at a time, a row stopped by a stop token and
given to a new request before its in-flight step is collected gives the old request nothing
more, and an engine error or control work meets a step in flight."""

from __future__ import annotations

import asyncio
import time

import pytest

LOADED = {1: "tagger", 2: "other"}
MODELS = [("tagger", 1), ("base", 0), ("other", 2), ("base", 0), ("tagger", 1), ("other", 2)]
PROMPTS = [[1000 * k + i for k in range(1, 3 + 2 * i)] for i in range(6)]  # 2-12 tokens
MAX_TOKENS = [5, 1, 9, 3, 40, 7]  # the 12-token prompt with 40: its cache row fills first


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture()
def make_scheduler(serve_model, adapter_dirs):
    """make_scheduler(stop_ids, prefill_chunk, rows) over a fresh batch, adapters loaded."""
    from loralab.engine.continuous import ContinuousBatch
    from loralab.engine.lora_weights import read_lora
    from loralab.serve.metrics import Metrics
    from loralab.serve.scheduler import Scheduler

    loras = {k: read_lora(adapter_dirs[name], serve_model)[0] for k, name in LOADED.items()}

    def make(stop_ids=(-1,), prefill_chunk=3, rows=3, max_len=40):
        batch = ContinuousBatch(serve_model, max_rows=rows, max_len=max_len)
        batch.set_adapters(loras)
        return Scheduler(batch, list(stop_ids), 16, Metrics(), prefill_chunk)

    return make


def request(i, loop, max_tokens=None):
    from loralab.engine.continuous import Sampling
    from loralab.serve.scheduler import Request

    model, adapter = MODELS[i]
    return Request(PROMPTS[i], model, adapter, max_tokens or MAX_TOKENS[i], Sampling(),
                   time.monotonic() + 60, loop)


def events_of(events, req):
    return [e for r, e in events if r is req]


def tokens(events, req):
    return [t for e in events_of(events, req) if e[0] == "tokens" for t in e[1]]


def checked_launches(scheduler):
    """Wrap the batch's launch: no request gets a step past its max_tokens (its tokens
    delivered and in flight) and no row one past its cache."""
    batch, real = scheduler.batch, scheduler.batch.launch

    def launch(*args):
        for row, req in scheduler.running.items():
            assert req.generated + req.in_flight < req.max_tokens, req.model
            assert batch.room(row) > 0
        return real(*args)

    batch.launch = launch


def overlapped(scheduler, reqs):
    """Queue `reqs` and run the loop's turns until all is done; the events."""
    scheduler.waiting.extend(reqs)
    events: list = []
    while scheduler.running or scheduler.waiting or scheduler.flights:
        scheduler._turn(events)
        assert len(scheduler.flights) <= 1
    return events


def one_step_at_a_time(scheduler, reqs):
    scheduler.waiting.extend(reqs)
    events: list = []
    while scheduler.running or scheduler.waiting:
        scheduler._drop_finished(events)
        scheduler._admit(events)
        scheduler._step(events)
    return events


@pytest.mark.parametrize("prefill_chunk", [3, 0])
def test_overlapped_turns_give_each_request_the_events_of_single_steps(make_scheduler, loop,
                                                                       prefill_chunk):
    """Six requests of two adapters and the base on three rows (so rows are reused), finishing
    by max_tokens (1 to 9), by a full cache row, and by a stop token: each one's events are
    those the one-step-at-a-time loop gives it, no launch runs a row past its max_tokens or
    its cache, and the counters add up."""
    first = request(0, loop)
    reference = one_step_at_a_time(make_scheduler(prefill_chunk=prefill_chunk), [first])
    stop = tokens(reference, first)[2]  # the first request stops on its third token
    reqs = [request(i, loop) for i in range(6)]
    want = one_step_at_a_time(make_scheduler([stop], prefill_chunk), reqs)
    scheduler = make_scheduler([stop], prefill_chunk)
    checked_launches(scheduler)
    got_reqs = [request(i, loop) for i in range(6)]
    got = overlapped(scheduler, got_reqs)
    for mine, theirs in zip(got_reqs, reqs, strict=True):
        assert events_of(got, mine) == events_of(want, theirs), mine.model
    assert events_of(got, got_reqs[0])[-1] == ("done", "stop")
    assert events_of(got, got_reqs[4])[-1] == ("done", "length")
    assert 1 < len(tokens(got, got_reqs[4])) < MAX_TOKENS[4]  # its cache row filled
    m = scheduler.metrics
    assert m.step_rows + m.mixed_decode_rows == sum(m.generated.values()) - m.ttft_count
    assert m.ttft_count == 6 and sum(m.generated.values()) == sum(r.generated for r in got_reqs)
    if prefill_chunk:
        assert m.mixed_prompt_tokens == sum(map(len, PROMPTS))
    assert not scheduler.running and len(scheduler.batch.free_rows) == 3
    assert all(r.in_flight == 0 and r.finished for r in got_reqs)


def test_a_stopped_row_reused_before_its_step_is_collected(make_scheduler, loop):
    """One row. A stops on a stop token seen when step k is collected, but step k+1, already
    launched, runs A's row too; B begins in that row before step k+1 is collected. A gets no
    token after its stop token, B gets exactly its tokens alone."""
    a_alone = request(2, loop, 9)
    want_a = tokens(one_step_at_a_time(make_scheduler(), [a_alone]), a_alone)
    cut = next(i for i in range(1, 9) if want_a[i] not in want_a[:i])
    stop = want_a[cut]
    b_alone = request(5, loop)
    want_b = events_of(one_step_at_a_time(make_scheduler([stop], 0, rows=1), [b_alone]),
                       b_alone)
    scheduler = make_scheduler([stop], rows=1)
    a, b = request(2, loop, 9), request(5, loop)
    real_begin, owners_at_begin = scheduler.batch.begin, []

    def begin(prompt, *args):
        owners_at_begin.append([[id(r) for r in f.owners.values()] for f in scheduler.flights])
        return real_begin(prompt, *args)

    scheduler.batch.begin = begin
    events = overlapped(scheduler, [a, b])
    assert owners_at_begin == [[], [[id(a)]]]  # B took the row while A's step was in flight
    assert events_of(events, a) == [("tokens", [t]) for t in want_a[:cut + 1]] + [
        ("done", "stop")]
    assert events_of(events, b) == want_b
    assert a.generated == cut + 1 and a.in_flight == 0


@pytest.mark.parametrize("half", ["launch", "collect"])
def test_an_engine_error_with_a_step_in_flight_fails_its_requests(make_scheduler, loop, half):
    """Two requests decoding, a step in flight; the next launch (or the collect of the step in
    flight) fails: both get the engine's 500 once and nothing else after, the rows are free
    and nothing is in flight; a request after that gets its tokens alone."""
    scheduler = make_scheduler(prefill_chunk=0)
    reqs = [request(0, loop, 20), request(1, loop, 20)]
    scheduler.waiting.extend(reqs)
    events: list = []
    for _ in range(3):
        scheduler._turn(events)
    assert scheduler.flights and all(r.generated for r in reqs)
    real = getattr(scheduler.batch, half)

    def broken(*args):
        setattr(scheduler.batch, half, real)
        raise RuntimeError("boom")

    setattr(scheduler.batch, half, broken)
    scheduler._turn(events)
    for req in reqs:
        assert events_of(events, req)[-1][:2] == ("error", 500)
        assert sum(e[0] == "error" for e in events_of(events, req)) == 1
    assert not scheduler.flights and not scheduler.running
    assert len(scheduler.batch.free_rows) == 3
    assert scheduler.metrics.requests[("tagger", "error")] == 1
    late, solo = request(3, loop), request(3, loop)
    after = overlapped(scheduler, [late])
    assert events_of(after, late) == events_of(one_step_at_a_time(make_scheduler(), [solo]), solo)


def test_control_work_runs_with_no_step_in_flight(make_scheduler, loop):
    """An adapter swap drops the graphs a launched step replays: the loop collects the step in
    flight (and hands out its tokens) before it runs control work."""
    scheduler = make_scheduler()
    req = request(4, loop)
    scheduler.waiting.append(req)
    events: list = []
    while req.generated < 2:
        scheduler._turn(events)
    assert scheduler.flights
    seen = []
    scheduler.call(lambda: seen.append((len(scheduler.flights), req.generated, req.in_flight)))
    assert scheduler._next_work(busy=True)
    assert seen and seen[0][0] == 0 and seen[0][1] > 2 and seen[0][2] == 0
