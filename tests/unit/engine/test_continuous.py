"""The continuous batch: rows that join mid-decode, leave early and mix adapters give the greedy
tokens the engine's generate gives each prompt alone."""

from __future__ import annotations

import random

import pytest
import torch

from loralab.engine import GenSettings, generate
from loralab.engine.continuous import ContinuousBatch, Sampling, sample

NEW = 7


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(3)
    return [[rng.randrange(1000, 150000) for _ in range(n)] for n in (5, 12, 3, 9, 17)]


@pytest.fixture(scope="module")
def adapters(lively_model, read_adapters):
    """Two random PEFT adapters of lively_model as {module: (A, B, scale)}, ranks 4 and 2 and
    different target sets."""
    specs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])]
    return read_adapters(lively_model, specs, 0, "adapter")


def alone(model, prompt, lora=None, new=NEW):
    """The engine's greedy tokens for one prompt on its own."""
    settings = GenSettings(max_new_tokens=new, min_new_tokens=new, engine="static",
                           stop_ids=(-1,), pad_id=0)  # -1: no stop token, `new` tokens each
    return generate(model, None, [prompt], settings, lora)[0][0].ids


def drive(batch, plan, new=NEW):
    """Run the batch: `plan` maps a step number to [(key, prompt, adapter)] joining then.
    Returns {key: tokens}; a row leaves as soon as it has `new` tokens."""
    out, owner, step = {}, {}, 0
    while plan or batch.busy():
        for key, prompt, adapter in plan.pop(step, []):
            rows, first = batch.add([prompt], adapter)
            owner[rows[0]], out[key] = key, [first[0]]
        for row, token in batch.step().items():
            out[owner[row]].append(token)
            if len(out[owner[row]]) == new:
                batch.free(row)
        step += 1
    return out


def test_rows_joining_mid_decode_match_each_prompt_alone(lively_model, prompts):
    batch = ContinuousBatch(lively_model, max_rows=4, max_len=40)
    plan = {0: [(0, prompts[0], 0), (1, prompts[1], 0)], 2: [(2, prompts[2], 0)],
            5: [(3, prompts[3], 0)], 9: [(4, prompts[4], 0)]}
    got = drive(batch, plan)
    for i, prompt in enumerate(prompts):
        assert got[i] == alone(lively_model, prompt), i
    assert not batch.busy() and len(batch.free_rows) == 4


def test_two_adapters_and_the_base_share_each_step(lively_model, prompts, adapters):
    batch = ContinuousBatch(lively_model, max_rows=5, max_len=40)
    batch.set_adapters({1: adapters[0], 2: adapters[1]})
    plan = {0: [(0, prompts[0], 1), (1, prompts[1], 2), (2, prompts[2], 0)],
            3: [(3, prompts[3], 2), (4, prompts[4], 1)]}
    loras = {0: None, 1: adapters[0], 2: adapters[1]}
    expected = {key: alone(lively_model, prompt, loras[adapter])
                for step in plan.values() for key, prompt, adapter in step}
    got = drive(batch, plan)
    assert got == expected
    # the adapters change the outputs, so equality above means each row got its own
    assert expected[0] != alone(lively_model, prompts[0])
    assert expected[1] != alone(lively_model, prompts[1])


def test_unloading_an_adapter_keeps_the_others(lively_model, prompts, adapters):
    batch = ContinuousBatch(lively_model, max_rows=2, max_len=40)
    batch.set_adapters({1: adapters[0], 2: adapters[1]})
    first = drive(batch, {0: [(0, prompts[1], 2)]})
    batch.set_adapters({2: adapters[1]})
    assert batch.adapter_bytes() > 0
    assert drive(batch, {0: [(0, prompts[1], 2)]}) == first
    with pytest.raises(KeyError):
        batch.add([prompts[0]], 1)


def test_seeded_sampling_repeats_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        draws.append([int(sample(logits, Sampling(1.0, 1.0, 7), gen)) for _ in range(30)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(logits, 0)
    top = [int(sample(logits, Sampling(1.0, float(probs[0]) + 1e-3, None), gen))
           for _ in range(50)]
    assert set(top) <= {0, 1} and 1 in top  # the two tokens whose mass reaches top_p


def test_a_prompt_longer_than_the_cache_is_refused(lively_model):
    batch = ContinuousBatch(lively_model, max_rows=1, max_len=8)
    with pytest.raises(ValueError):
        batch.add([list(range(100, 110))])
    assert batch.free_rows == [0]


def test_stacked_bytes_counts_what_the_stack_allocates(lively_model, adapters):
    """Adapters on different projections: each pads every member of a group it trains to its
    rank, and holds zero columns in the groups only the other trains."""
    from loralab.engine.continuous_lora import stacked_bytes

    batch = ContinuousBatch(lively_model, max_rows=1, max_len=16)
    batch.set_adapters({1: adapters[0], 2: adapters[1]})
    itemsize = batch.dtype.itemsize
    assert stacked_bytes(lively_model, adapters, itemsize) == batch.adapter_bytes()
    own = sum(a.nbytes + b.nbytes for a, b, _ in adapters[0].values())
    assert stacked_bytes(lively_model, adapters, itemsize) > 2 * own  # more than the files


def test_cache_bytes_is_what_the_batch_allocates(lively_model):
    from loralab.engine.continuous import cache_bytes

    batch = ContinuousBatch(lively_model, max_rows=3, max_len=24)
    held = sum(t.nbytes for t in [*batch.keys, *batch.values, batch.logits])
    assert cache_bytes(lively_model, 3, 24) == held


def test_one_prefill_mixing_adapters_and_the_base_gives_each_row_its_own_tokens(
        lively_model, prompts, adapters):
    """Rows of two adapters and the base prefilled together (stack + per-row masks): each
    row's first token and next decode tokens are those of its prompt prefilled alone with its
    adapter."""
    batch = ContinuousBatch(lively_model, max_rows=5, max_len=40)
    batch.set_adapters({1: adapters[0], 2: adapters[1]})
    ids = [1, 0, 2, 1, 2]
    rows, firsts = batch.add(prompts, ids)
    got = {row: [first] for row, first in zip(rows, firsts, strict=True)}
    for _ in range(NEW - 1):
        for row, token in batch.step().items():
            got[row].append(token)
    loras = {0: None, 1: adapters[0], 2: adapters[1]}
    for row, prompt, adapter in zip(rows, prompts, ids, strict=True):
        assert got[row] == alone(lively_model, prompt, loras[adapter]), (prompt, adapter)
        single = ContinuousBatch(lively_model, max_rows=1, max_len=40)
        single.set_adapters({1: adapters[0], 2: adapters[1]})
        assert single.add([prompt], adapter)[1] == [got[row][0]]
    assert got[rows[0]] != alone(lively_model, prompts[0])  # the adapters change the tokens
    assert [batch.rows[row].adapter for row in rows] == ids
    assert batch.row_adapter[rows].tolist() == ids


def test_add_checks_every_adapter_id_and_keeps_its_rows_free(lively_model, prompts, adapters):
    batch = ContinuousBatch(lively_model, max_rows=3, max_len=40)
    batch.set_adapters({1: adapters[0]})
    with pytest.raises(KeyError):
        batch.add(prompts[:2], [1, 2])
    with pytest.raises(ValueError):
        batch.add(prompts[:2], [1])
    assert batch.free_rows == [0, 1, 2] and not batch.busy()
    same = batch.add(prompts[:2], [1, 1])[1]  # one adapter for all: the one-adapter path
    assert same == [alone(lively_model, p, adapters[0], new=1)[0] for p in prompts[:2]]
