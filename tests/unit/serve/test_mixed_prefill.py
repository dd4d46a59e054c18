"""The scheduler prefills rows of different adapters and the base together (grouped by length
only), and an adapter unloaded before admission fails only its own requests. These are the
whole-prefill path's (prefill_chunk 0); test_chunked_prefill.py has the mixed steps'."""

from __future__ import annotations

import asyncio
import time


def request(prompt, model, adapter, loop, max_tokens=4):
    from loralab.engine.continuous import Sampling
    from loralab.serve.scheduler import Request

    return Request(prompt, model, adapter, max_tokens, Sampling(), time.monotonic() + 60, loop)


PROMPTS = [[1000 * k + i for k in range(1, 7)][: 4 + i % 3] for i in range(6)]  # 4-6 tokens
MODELS = [("tagger", 1), ("base", 0), ("other", 2), ("tagger", 1), ("other", 2), ("base", 0)]


def test_requests_of_different_adapters_share_one_prefill_group():
    from loralab.serve.scheduler import prefill_groups

    loop = asyncio.new_event_loop()
    try:
        reqs = [request(p, m, a, loop) for p, (m, a) in zip(PROMPTS, MODELS, strict=True)]
        groups = prefill_groups(reqs, 48)
        assert len(groups) == 1 and {r.adapter for r in groups[0]} == {0, 1, 2}
        long = request(list(range(100, 120)), "base", 0, loop)  # past GROUP_SPREAD: its own
        assert sorted(map(len, prefill_groups([*reqs, long], 48))) == [1, 6]
        too_long = request(PROMPTS[0], "tagger", 1, loop, max_tokens=44)  # 4 + 44 = 48
        groups = prefill_groups([*reqs, too_long], 48)
        assert len(groups) > 1  # no row's tokens pass the cache after padding
        assert all(max(len(r.prompt_ids) for r in g) + r.max_tokens <= 48
                   for g in groups for r in g)
    finally:
        loop.close()


def test_a_mixed_prefill_gives_each_request_its_tokens_alone(scheduler_for):
    loaded = {1: "tagger", 2: "other"}
    loop = asyncio.new_event_loop()
    try:
        together = scheduler_for(loaded)
        reqs = [request(p, m, a, loop) for p, (m, a) in zip(PROMPTS, MODELS, strict=True)]
        got = tokens_of(together, reqs)
        assert together.metrics.prefills == 1
        assert together.metrics.generated == {"tagger": 8, "base": 8, "other": 8}
        for req in reqs:
            alone = scheduler_for(loaded)
            assert tokens_of(alone, [request(req.prompt_ids, req.model, req.adapter, loop)]
                             ) == [got[reqs.index(req)]], req.model
    finally:
        loop.close()


def tokens_of(scheduler, reqs):
    """Admit `reqs` at once and step until they finish; each request's tokens, in order."""
    scheduler.waiting.extend(reqs)
    events: list = []
    scheduler._admit(events)
    while scheduler.running:
        scheduler._step(events)
    assert all(e[0] in ("tokens", "done") for _, e in events), events
    return [[t for r, e in events if r is req and e[0] == "tokens" for t in e[1]]
            for req in reqs]


def test_an_adapter_unloaded_before_admission_fails_only_its_requests(scheduler_for):
    """The race: requests resolved the adapter `gone` (id 2), then its unload ran before they
    reached the queue. They get their 409; the tagger and base rows of the same length group
    are prefilled (once) and run."""
    loop = asyncio.new_event_loop()
    try:
        scheduler = scheduler_for({1: "tagger"})
        models = [("tagger", 1), ("gone", 2), ("base", 0), ("gone", 2)]
        reqs = [request(p, m, a, loop) for p, (m, a) in zip(PROMPTS[:4], models, strict=True)]
        scheduler.waiting.extend(reqs)
        out: list = []
        scheduler._admit(out)
    finally:
        loop.close()
    errors = [(req.model, event) for req, event in out if event[0] == "error"]
    assert errors == [("gone", ("error", 409, "the adapter 'gone' was unloaded"))] * 2
    assert sorted(r.model for r in scheduler.running.values()) == ["base", "tagger"]
    assert scheduler.metrics.prefills == 1
    assert scheduler.metrics.requests[("gone", "unloaded")] == 2
    assert scheduler.metrics.generated == {"tagger": 1, "base": 1}
