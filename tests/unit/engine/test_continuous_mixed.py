"""Mixed steps (chunked prefill): a prompt fed a few tokens a step, while other rows of other
adapters decode in the same forward, gets the tokens it gets prefilled whole by add()."""

from __future__ import annotations

import random

import pytest
import torch

from loralab.engine.continuous import ContinuousBatch, Sampling
from loralab.engine.continuous_mixed import plan_step
from loralab.engine.lora_weights import read_lora

NEW = 6


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    return [[rng.randrange(1000, 150000) for _ in range(n)] for n in (5, 12, 3, 9, 17, 7)]


@pytest.fixture(scope="module")
def loras(lively_model, save_adapter, tmp_path_factory):
    """{0: None, 1: adapter, 2: adapter}: two random PEFT adapters of lively_model on
    different projections and ranks."""
    specs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])]
    out = {0: None}
    for seed, spec in enumerate(specs):
        folder = save_adapter(lively_model, tmp_path_factory.mktemp(f"mixed{seed}"), seed + 7,
                              **spec)
        out[seed + 1], reason = read_lora(folder, lively_model)
        assert reason is None, reason
    return out


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
