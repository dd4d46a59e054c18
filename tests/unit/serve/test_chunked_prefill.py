"""The scheduler with chunked prefill (prefill_chunk > 0): admitted requests become prefilling
rows fed a chunk per mixed step beside the decoding rows; their tokens, first-token times,
counters, cancellation, timeouts and adapter unloads are those of whole prefills."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

LOADED = {1: "tagger", 2: "other"}
MODELS = [("tagger", 1), ("base", 0), ("other", 2), ("tagger", 1), ("other", 2), ("base", 0)]
PROMPTS = [[1000 * k + i for k in range(1, 3 + 2 * i)] for i in range(6)]  # 2-12 tokens


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def request(prompt, model, adapter, loop, max_tokens=4, seconds=60.0):
    from loralab.engine.continuous import Sampling
    from loralab.serve.scheduler import Request

    return Request(prompt, model, adapter, max_tokens, Sampling(),
                   time.monotonic() + seconds, loop)


def run(scheduler, joining):
    """`joining`: step number -> requests queued before it. Admit and step until every request
    finished; each request's tokens, in order, and the events."""
    events: list = []
    step = 0
    while joining or scheduler.running or scheduler.waiting:
        scheduler.waiting.extend(joining.pop(step, []))
        scheduler._drop_finished(events)
        scheduler._admit(events)
        scheduler._step(events)
        step += 1
    return events


def tokens(events, req):
    return [t for r, e in events if r is req and e[0] == "tokens" for t in e[1]]


def test_chunked_requests_of_mixed_adapters_get_their_tokens_alone(scheduler_for, loop):
    """Six requests of two adapters and the base, 2-12 prompt tokens fed 3 a step, joining at
    different steps: each one's tokens are its tokens prefilled whole and alone; the counters
    count mixed steps, their prompt tokens and decode rows, and every first token."""
    scheduler = scheduler_for(LOADED, prefill_chunk=3)
    reqs = [request(p, m, a, loop) for p, (m, a) in zip(PROMPTS, MODELS, strict=True)]
    events = run(scheduler, {0: reqs[:3], 2: reqs[3:5], 5: reqs[5:]})
    assert all(e[0] in ("tokens", "done") for _, e in events), events
    for req in reqs:
        alone = scheduler_for(LOADED)  # prefill_chunk 0: the whole-prefill path
        single = request(req.prompt_ids, req.model, req.adapter, loop)
        assert tokens(events, req) == tokens(run(alone, {0: [single]}), single), req.model
        assert req.first_token_at is not None and req.generated == 4
    m = scheduler.metrics
    assert m.prefills == 0 and m.mixed_steps > 0 and m.steps > 0
    assert m.mixed_prompt_tokens == sum(map(len, PROMPTS))
    assert m.ttft_count == 6 and m.requests[("tagger", "length")] == 2
    assert m.generated == {"tagger": 8, "base": 8, "other": 8}
    decoded = m.step_rows + m.mixed_decode_rows  # every token but the first tokens
    assert decoded == sum(m.generated.values()) - m.ttft_count
    assert len(scheduler.batch.free_rows) == 6


def test_a_request_cancelled_mid_prompt_frees_its_row(scheduler_for, loop):
    scheduler = scheduler_for(LOADED, prefill_chunk=2)
    long, short = request(PROMPTS[5], "tagger", 1, loop), request(PROMPTS[0], "base", 0, loop)
    scheduler.waiting.extend([short, long])
    events: list = []
    scheduler._admit(events)
    scheduler._step(events)  # the chunk is short's 2 tokens; long has not begun
    scheduler._step(events)  # long's first 2 of 12, short decodes
    assert scheduler.batch.prefilling() and long.first_token_at is None
    scheduler.cancel(long)
    scheduler._drop_finished(events)
    assert list(scheduler.running.values()) == [short]
    assert not scheduler.batch.prefilling() and len(scheduler.batch.free_rows) == 5
    assert scheduler.metrics.requests[("tagger", "cancelled")] == 1
    events += run(scheduler, {})
    assert not [e for r, e in events if r is long]
    assert len(tokens(events, short)) == 4 and scheduler.metrics.ttft_count == 1


def test_a_request_expiring_mid_prompt_is_a_504_and_an_unload_a_409(scheduler_for, loop):
    scheduler = scheduler_for(LOADED, prefill_chunk=1)
    slow = request(PROMPTS[4], "base", 0, loop, seconds=0.05)
    unloaded = request(PROMPTS[3], "other", 2, loop)
    scheduler.waiting.extend([slow, unloaded])
    events: list = []
    scheduler._admit(events)
    scheduler._step(events)
    scheduler.fail_adapter(2, "the adapter 'other' was unloaded")  # sends its own events
    time.sleep(0.06)
    scheduler._drop_finished(events)
    assert events == [(slow, ("error", 504, "the request timed out"))]
    assert not scheduler.running and len(scheduler.batch.free_rows) == 6
    assert scheduler.metrics.requests[("other", "unloaded")] == 1


def test_the_server_option_picks_the_path_and_both_give_the_same_text(make_server):
    """Through HTTP: whole prefills (--prefill-chunk 0) and 2-token chunks answer four
    concurrent requests of the adapters and the base with the same greedy text."""
    jobs = [("tagger", "one two three four five"), ("base", "a b"),
            ("other", "six seven eight nine ten eleven"), ("base", "twelve thirteen")]

    def answers(server):
        async def ask(http, model, prompt):
            reply = await http.post("/v1/completions", json={
                "model": model, "prompt": prompt, "temperature": 0, "max_tokens": 6})
            return reply.json()["choices"][0]["text"]

        async def all_at_once():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                return await asyncio.gather(*[ask(http, m, p) for m, p in jobs])

        return asyncio.run(all_at_once())

    whole, chunked = make_server(prefill_chunk=0), make_server(prefill_chunk=2)
    assert answers(chunked) == answers(whole)
    assert whole.state.metrics.mixed_steps == 0 and whole.state.metrics.prefills > 0
    assert chunked.state.metrics.prefills == 0 and chunked.state.metrics.mixed_steps > 0
    text = httpx.get(chunked.url + "/metrics").text
    assert "loralab_mixed_steps_total" in text
    assert "loralab_mixed_step_prompt_tokens_total" in text
    # every collected step adds its wait for the tokens (on the CPU they are there already)
    wait = float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("loralab_collect_wait_seconds_total ")))
    assert 0 < wait < chunked.state.metrics.mixed_seconds + chunked.state.metrics.step_seconds
