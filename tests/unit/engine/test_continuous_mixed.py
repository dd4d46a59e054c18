"""Mixed steps (chunked prefill): a prompt fed a few tokens a step, while other rows of other
adapters decode in the same forward, gets the tokens it gets prefilled whole by add()."""

from __future__ import annotations

import random

import pytest
import torch

from loralab.engine.continuous import ContinuousBatch, Sampling
from loralab.engine.continuous_mixed import plan_step

NEW = 6


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    return [[rng.randrange(1000, 150000) for _ in range(n)] for n in (5, 12, 3, 9, 17, 7)]


@pytest.fixture(scope="module")
def loras(lively_model, read_adapters):
    """{0: None, 1: adapter, 2: adapter}: two random PEFT adapters of lively_model on
    different projections and ranks."""
    specs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])]
    return {0: None, **dict(enumerate(read_adapters(lively_model, specs, 7, "mixed"), 1))}


def new_batch(model, loras, rows=6, max_len=48):
    batch = ContinuousBatch(model, max_rows=rows, max_len=max_len)
    batch.set_adapters({k: v for k, v in loras.items() if k})
    return batch


def whole(model, loras, prompt, adapter, new=NEW):
    """The prompt's tokens alone, prefilled whole by add() and decoded by step(); with the
    first token's logits."""
    batch = new_batch(model, loras, rows=1)
    rows, first = batch.add([prompt], adapter)
    logits = batch.logits[rows[0]].clone()
    tokens = first + [batch.step()[rows[0]] for _ in range(new - 1)]
    return tokens, logits


def drive(batch, plan, budget, new=NEW):
    """`plan`: step number -> [(key, prompt, adapter, "add" | "begin")] joining then. Steps
    with `budget` prompt tokens until every row has `new` tokens (then it leaves). Returns
    ({key: tokens}, {key: the step number of its first token})."""
    out, owner, first_at, step = {}, {}, {}, 0
    while plan or batch.busy():
        for key, prompt, adapter, how in plan.pop(step, []):
            if how == "add":
                rows, first = batch.add([prompt], adapter)
                owner[rows[0]], out[key], first_at[key] = key, [first[0]], step
            else:
                owner[batch.begin(prompt, adapter)], out[key] = key, []
        for row, token in batch.step(budget).items():
            key = owner[row]
            first_at.setdefault(key, step)
            out[key].append(token)
            if len(out[key]) == new:
                batch.free(row)
        step += 1
    return out, first_at


def test_chunked_prompts_beside_decoding_rows_of_other_adapters_match_add(
        lively_model, loras, prompts):
    """Rows of adapter 1, adapter 2 and the base decode while others are fed 3 prompt tokens
    a step (the 17-token prompt over 6 steps): every row's greedy tokens are its tokens alone."""
    batch = new_batch(lively_model, loras)
    plan = {0: [(0, prompts[0], 1, "add"), (1, prompts[1], 2, "add")],
            1: [(2, prompts[4], 0, "begin"), (3, prompts[3], 2, "begin")],
            3: [(4, prompts[2], 1, "begin"), (5, prompts[5], 0, "add")]}
    jobs = {key: (prompt, adapter) for joining in plan.values()
            for key, prompt, adapter, _ in joining}
    got, first_at = drive(batch, plan, budget=3)
    for key, (prompt, adapter) in jobs.items():
        assert got[key] == whole(lively_model, loras, prompt, adapter)[0], (key, adapter)
    assert first_at[2] == 1 + 5  # 17 tokens at 3 a step: its first token on the 6th step
    assert not batch.busy() and len(batch.free_rows) == 6
    # the adapters change the tokens, so equality above means each row got its own
    assert got[3] != whole(lively_model, loras, prompts[3], 0)[0]


def test_a_prompt_longer_than_the_budget_gives_the_logits_of_add(lively_model, loras, prompts):
    batch = new_batch(lively_model, loras)
    row = batch.begin(prompts[4], 2)
    steps = [batch.step(4) for _ in range(5)]  # 17 tokens, 4 a step: the 5th feeds the last
    assert steps[:4] == [{}] * 4 and list(steps[4]) == [row]
    tokens, logits = whole(lively_model, loras, prompts[4], 2)
    torch.testing.assert_close(batch.logits[row], logits, rtol=1e-4, atol=1e-4)
    assert [steps[4][row]] + [batch.step(4)[row] for _ in range(NEW - 1)] == tokens
    assert batch.rows[row].next_slot == len(prompts[4]) + NEW - 1


def test_a_row_finishes_its_prompt_in_the_step_another_is_mid_prompt(
        lively_model, loras, prompts):
    batch = new_batch(lively_model, loras)
    short, long = batch.begin(prompts[0], 1), batch.begin(prompts[1], 0)  # 5 and 12 tokens
    plan = plan_step(batch, 7)
    assert [(c.row, c.start, len(c.tokens), c.last) for c in plan.chunks] == [
        (short, 0, 5, True), (long, 0, 2, False)]
    first = batch.step(7)
    assert list(first) == [short] and batch.prefilling() == [long]
    assert batch.pending_tokens() == 10
    second = batch.step(7)  # short decodes, long gets 7 more of its 10
    assert list(second) == [short] and batch.pending_tokens() == 3
    third = batch.step(7)
    assert sorted(third) == sorted([short, long])
    got_short = [first[short], second[short], third[short]]
    got_long = [third[long]]
    for _ in range(NEW - 1):
        step = batch.step(7)
        got_short.append(step[short])
        got_long.append(step[long])
    assert got_short[:NEW] == whole(lively_model, loras, prompts[0], 1)[0]
    assert got_long == whole(lively_model, loras, prompts[1], 0)[0]


def test_freeing_a_row_mid_prompt_leaves_the_others_and_its_row_reusable(
        lively_model, loras, prompts):
    batch = new_batch(lively_model, loras, rows=2)
    rows, first = batch.add([prompts[3]], 1)
    decoding = [first[0]]
    gone = batch.begin(prompts[4], 2)
    for _ in range(4):  # 12 of its 17 tokens in, the decoding row on meanwhile
        decoding.append(batch.step(3)[rows[0]])
    batch.free(gone)  # the client went away mid-prompt
    assert batch.prefilling() == [] and batch.pending_tokens() == 0
    assert batch.free_rows == [gone]
    again = batch.begin(prompts[5], 0)  # the same row, 7 tokens: slots 7-11 are stale
    assert again == gone
    fresh = []
    while len(fresh) < NEW:
        step = batch.step(3)
        decoding.append(step[rows[0]])
        if again in step:
            fresh.append(step[again])
    assert decoding[:NEW] == whole(lively_model, loras, prompts[3], 1)[0]
    assert fresh == whole(lively_model, loras, prompts[5], 0)[0]


def test_begin_checks_its_request_and_keeps_the_row_free(lively_model, loras, prompts):
    batch = new_batch(lively_model, loras, rows=1, max_len=8)
    with pytest.raises(KeyError):
        batch.begin(prompts[0], 3)
    with pytest.raises(ValueError):
        batch.begin(list(range(100, 108)))  # 8 tokens leave no slot for a new one
    with pytest.raises(ValueError):
        batch.begin([])
    assert batch.free_rows == [0] and not batch.busy()
    batch.begin(prompts[0], 0, Sampling(temperature=0.7, seed=3))
    with pytest.raises(RuntimeError):
        batch.begin(prompts[0])


def real_cells(batch, plan):
    """{(row, slot)} of the cache cells a mixed step's real tokens write: each decoding row's
    next slot and each chunk's slots."""
    cells = {(row, batch.rows[row].next_slot) for row in plan.decode}
    return cells | {(c.row, c.start + t) for c in plan.chunks for t in range(len(c.tokens))}


@pytest.mark.parametrize("budget", [60, 10])
def test_padding_slots_never_touch_a_real_row(lively_model, loras, prompts, budget):
    """Budget 60, far above the waiting prompts (most prompt slots padding), or 10 (prompts of
    17 and 12 tokens mid-prompt over steps); rows idle or prefilling in the decode slots.
    Across every mixed step the only cache cells of the real rows that change are those its
    real tokens write, and every row's tokens are those of budget 3."""
    schedule = {0: [(0, prompts[3], 1, "add"), (1, prompts[4], 2, "begin")],
                1: [(2, prompts[1], 0, "begin")]}
    batch = new_batch(lively_model, loras, rows=4)
    got, owner, step, mixed = {}, {}, 0, 0
    while step < 2 or batch.busy():
        for key, prompt, adapter, how in schedule.get(step, []):
            if how == "add":
                rows, first = batch.add([prompt], adapter)
                owner[rows[0]], got[key] = key, first
            else:
                owner[batch.begin(prompt, adapter)], got[key] = key, []
        step += 1
        if not batch.prefilling():  # a decode step: idle rows write their slot 0, as ever
            before = None
        else:
            mixed += 1
            cells = real_cells(batch, plan_step(batch, budget))
            before = [t[: batch.max_rows].clone() for t in [*batch.keys, *batch.values]]
            valid = batch.valid[: batch.max_rows].clone()
        for row, token in batch.step(budget).items():
            got[owner[row]].append(token)
            if len(got[owner[row]]) == NEW:
                batch.free(row)
        if before is None:
            continue
        for old, new in zip(before, [*batch.keys, *batch.values], strict=True):
            changed = (new[: batch.max_rows] != old).any(-1).any(1).nonzero().tolist()
            assert {tuple(cell) for cell in changed} <= cells
        flipped = (batch.valid[: batch.max_rows] != valid).nonzero().tolist()
        assert {tuple(cell) for cell in flipped} <= cells
    assert mixed >= 2
    expected, _ = drive(new_batch(lively_model, loras, rows=4), schedule, budget=3)
    assert got == expected


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
# tensors made from host values: on CUDA a copy from pageable memory, which a graph capture
# refuses (a sign table built with torch.tensor once sent every mixed step back to eager)
HOST_TENSORS = ("tensor", "as_tensor", "from_numpy")


def test_the_step_bodies_never_sync_with_the_host(lively_model, loras, prompts, monkeypatch):
    """While the mixed and decode steps' bodies (what a CUDA graph captures) run, every way a
    tensor's value reaches Python, and every tensor made from host values, raises; the steps
    still finish with the right tokens."""
    from loralab.engine import continuous_mixed

    def forbid(*args, **kwargs):
        raise AssertionError("a host sync inside the step body")

    ran = []

    def no_syncs(body, kind):
        def run(*args, **kwargs):
            with monkeypatch.context() as patch:
                for name in SYNCS:
                    patch.setattr(torch.Tensor, name, forbid)
                for name in HOST_TENSORS:
                    patch.setattr(torch, name, forbid)
                with pytest.raises(AssertionError):
                    bool(torch.ones(1))  # the patch holds
                body(*args, **kwargs)
            ran.append(kind)

        return run

    monkeypatch.setattr(continuous_mixed, "forward",
                        no_syncs(continuous_mixed.forward, "mixed"))
    batch = new_batch(lively_model, loras)
    monkeypatch.setattr(batch, "_decode", no_syncs(batch._decode, "decode"))
    plan = {0: [(0, prompts[0], 1, "add"), (1, prompts[1], 2, "begin")],
            2: [(2, prompts[4], 0, "begin")]}
    got, _ = drive(batch, plan, budget=4)
    assert got[1] == whole(lively_model, loras, prompts[1], 2)[0]
    assert got[2] == whole(lively_model, loras, prompts[4], 0)[0]
    assert {"mixed", "decode"} <= set(ran)


def test_mixed_steps_of_different_plans_run_the_same_shapes(lively_model, loras, prompts,
                                                            monkeypatch):
    """Steps with 1 or 2 decoding rows and 1 to 3 chunks of 1-8 prompt tokens: at one attention
    length (the bucket forced to max_len, as a graph would attend) every linear and attention
    call inside the body gets the same shapes, so one captured graph serves them all; and the
    tokens stay those of each prompt alone."""
    from loralab.engine import continuous_mixed

    F = torch.nn.functional  # noqa: N806
    steps, calls = [], None

    def recording(name, fn):
        def call(*args, **kwargs):
            if calls is not None:
                calls.append((name, [tuple(a.shape) for a in args if torch.is_tensor(a)]))
            return fn(*args, **kwargs)

        return call

    def forward(*args, **kwargs):
        nonlocal calls
        calls = []
        continuous_mixed_forward(*args, **kwargs)
        steps.append(calls)
        calls = None

    continuous_mixed_forward = continuous_mixed.forward
    monkeypatch.setattr(continuous_mixed, "forward", forward)
    for name in ("linear", "scaled_dot_product_attention"):
        monkeypatch.setattr(F, name, recording(name, getattr(F, name)))
    batch = new_batch(lively_model, loras)
    batch._bucket = lambda need: batch.max_len
    plan = {0: [(0, prompts[0], 1, "add"), (1, prompts[2], 2, "begin")],
            1: [(2, prompts[1], 0, "begin"), (3, prompts[5], 1, "begin"),
                (4, prompts[3], 2, "begin")]}
    jobs = {key: (p, a) for joining in plan.values() for key, p, a, _ in joining}
    got, _ = drive(batch, plan, budget=8)
    assert len(steps) > 3 and steps[0]
    assert all(step == steps[0] for step in steps)
    for key, (prompt, adapter) in jobs.items():
        assert got[key] == whole(lively_model, loras, prompt, adapter)[0], key


def test_new_adapters_or_budget_drop_the_graphs_that_read_the_old(lively_model, loras):
    from loralab.engine.continuous_mixed import step_inputs

    batch = new_batch(lively_model, loras, rows=2)
    inputs = step_inputs(batch, 8)
    assert step_inputs(batch, 8) is inputs and inputs.ids.shape == (8,)
    batch.graphs = {("decode", 128): {}, ("mixed", 128): {}}
    assert step_inputs(batch, 16) is not inputs and list(batch.graphs) == [("decode", 128)]
    batch.graphs[("mixed", 256)] = {}
    batch.set_adapters({1: loras[1]})
    assert batch.graphs == {}
