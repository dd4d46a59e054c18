"""A step in two halves (launch, then collect): launch reads no token back, two steps launched
back to back give the tokens of two step() calls, each launched step owns its host buffers, and
a row freed and begun again while its old request's step is in flight gets its own tokens."""

from __future__ import annotations

import random

import pytest
import torch

from loralab.engine.continuous import ContinuousBatch, Sampling
from loralab.engine.continuous_host import HostRing

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(11)
    return [[rng.randrange(1000, 150000) for _ in range(n)] for n in (6, 13, 4, 9)]


@pytest.fixture(scope="module")
def loras(lively_model, read_adapters):
    specs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"])]
    return dict(enumerate(read_adapters(lively_model, specs, 3, "step"), 1))


def new_batch(model, loras, rows=4, max_len=48):
    batch = ContinuousBatch(model, max_rows=rows, max_len=max_len)
    batch.set_adapters(loras)
    return batch


def joined(batch, prompts):
    """A whole-prefilled row of adapter 1, a sampling row and a prefilling row of adapter 2."""
    batch.add([prompts[0]], 1)
    batch.begin(prompts[2], 0, Sampling(temperature=0.9, top_p=0.8, seed=4))
    batch.begin(prompts[1], 2)


def greedy_alone(model, loras, prompt, adapter, new):
    """The prompt's tokens alone: begun in a batch of its own and stepped."""
    batch = new_batch(model, loras, rows=1)
    row, out = batch.begin(prompt, adapter), []
    while len(out) < new:
        out += list(batch.step(5).values())
    assert row == 0
    return out[:new]


def test_launch_reads_no_token_and_back_to_back_launches_equal_steps(lively_model, loras,
                                                                    prompts, monkeypatch):
    """While launch runs, every way a tensor's value reaches Python raises and no host buffer
    is read; two launches then two collects, over mixed and decode steps with a sampling row,
    give what two step() calls give."""
    stepped, launched = new_batch(lively_model, loras), new_batch(lively_model, loras)
    joined(stepped, prompts)
    joined(launched, prompts)
    reads = []
    real_read = HostRing.read
    monkeypatch.setattr(HostRing, "read", lambda ring, ticket: reads.append(1) or
                        real_read(ring, ticket))

    def launch():
        with monkeypatch.context() as patch:
            for name in SYNCS:
                patch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("a host read"))
            before = len(reads)
            pending = launched.launch(5)
            assert len(reads) == before
        return pending

    mixed = 0
    for _ in range(6):
        want = [stepped.step(5), stepped.step(5)]
        first, second = launch(), launch()
        mixed += first.mixed + second.mixed
        assert [launched.collect(first), launched.collect(second)] == want
    assert 0 < mixed < 12  # mixed steps while the prompt goes in, decode steps after


def test_each_launched_step_owns_its_host_buffers(lively_model, loras, prompts):
    """Two steps in flight: their tokens land in two different host buffers, and their inputs
    go through two different host twins, so the second launch rewrites neither of the first
    step's; a third launch reuses the first's buffer, and then the first's tokens are gone
    (collecting it raises rather than give the third's)."""
    batch = new_batch(lively_model, loras)
    batch.begin(prompts[1], 1)
    batch.begin(prompts[3], 2)
    first = batch.launch(4)
    twins = batch.mixed_inputs.twins.buffers
    after_first = [b.clone() for b in twins]
    second = batch.launch(4)
    assert first.ticket.buffer.data_ptr() != second.ticket.buffer.data_ptr()
    assert first.mixed and second.mixed
    changed = [not torch.equal(b, a) for b, a in zip(twins, after_first, strict=True)]
    assert changed.count(True) == 1 and torch.equal(twins[changed.index(False)],
                                                   after_first[changed.index(False)])
    assert not torch.equal(twins[0], twins[1])  # the two steps' inputs, side by side
    batch.collect(first)
    batch.collect(second)
    third, fourth = batch.launch(4), batch.launch(4)
    assert third.ticket.buffer.data_ptr() == first.ticket.buffer.data_ptr()
    fifth = batch.launch(4)
    batch.collect(fourth)
    with pytest.raises(RuntimeError, match="overwrote"):
        batch.collect(third)
    assert set(batch.collect(fifth)) <= set(batch.busy())


class FakeEvent:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def record(self):
        self.log.append(f"record {self.name}")

    def synchronize(self):
        self.log.append(f"wait {self.name}")


def test_a_host_twin_is_refilled_only_after_its_last_copy(monkeypatch):
    """The ring's CUDA logic with stand-in events: each copy is followed by its buffer's
    event, and a buffer is written again only after waiting on that event."""
    ring, log = HostRing(3, torch.device("cpu")), []
    ring.events = [FakeEvent(log, 0), FakeEvent(log, 1)]
    target = torch.zeros(3, dtype=torch.long)
    writes = []
    real_copy = torch.Tensor.copy_

    def copy(self, src, non_blocking=False):
        if any(self.data_ptr() == b.data_ptr() for b in ring.buffers):
            log.append("write")
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    for values in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        ring.upload(values, target)
        writes.append(target.tolist())
    assert writes == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert log == ["wait 0", "write", "record 0", "wait 1", "write", "record 1",
                   "wait 0", "write", "record 0"]
    ticket = ring.download(torch.arange(2))
    assert ring.read(ticket) == [0, 1] and log[-1] == "wait 1"


def test_a_row_begun_again_while_its_old_request_is_in_flight(lively_model, loras, prompts):
    """One row: a request decodes in two launched steps; after the first is collected the row
    is freed and begun with a new prompt before the second is collected (its token there is
    the old request's, dropped). The new request's tokens are its tokens alone."""
    batch = new_batch(lively_model, loras, rows=1)
    row = batch.begin(prompts[0], 1)
    old = []
    while not old:  # its prompt in, its first token out
        old += list(batch.step(5).values())
    first, second = batch.launch(5), batch.launch(5)
    old.append(batch.collect(first)[row])
    batch.free(row)
    assert batch.begin(prompts[3], 2) == row
    third = batch.launch(5)  # the new prompt's chunk, queued behind the old request's step
    assert list(batch.collect(second)) == [row]  # the old request's token: the caller drops it
    new, pending = [], third
    while len(new) < 5:
        new += list(batch.collect(pending).values())
        pending = batch.launch(5)
    new += list(batch.collect(pending).values())
    assert old == greedy_alone(lively_model, loras, prompts[0], 1, 2)
    assert new[:5] == greedy_alone(lively_model, loras, prompts[3], 2, 5)


def test_begin_and_free_write_the_device_with_kernels_only(lively_model, loras, prompts,
                                                           monkeypatch):
    """begin() and free() run between a launch and its collect: they must not wait for the
    step in flight. Setting a tensor element from a Python value (`t[row] = 0`) is a blocking
    host-to-device copy on CUDA (on the H200 it serialised the scheduler with every step), so
    here it raises; the rows still give each prompt's own tokens."""
    batch = new_batch(lively_model, loras, rows=2)

    def forbid(*args, **kwargs):
        raise AssertionError("a tensor element set from a host value")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "__setitem__", forbid)
        row = batch.begin(prompts[0], 1)
        other = batch.begin(prompts[1], 2)
        batch.free(other)
    got = []
    while len(got) < 3:
        got += list(batch.step(5).values())
    assert got[:3] == greedy_alone(lively_model, loras, prompts[0], 1, 3)
    assert batch.busy() == [row]


def test_fused_shrinks_give_the_tokens_of_separate_shrinks(lively_model, loras, prompts):
    """With the adapters' A under the qkv and gate_up weights (continuous_lora.fuse_shrinks),
    mixed and decode steps of rows of two adapters and the base give the tokens the separate
    shrink GEMMs give; unloading every adapter leaves the base weights' values."""
    fused = new_batch(lively_model, loras)
    plain = ContinuousBatch(lively_model, max_rows=4, max_len=48)
    plain.fuse_shrinks = False
    plain.set_adapters(loras)
    assert len(fused.stack[0]["qkv"]) == 4 and len(fused.stack[0]["gate_up"]) == 4
    assert len(plain.stack[0]["qkv"]) == 2
    joined(fused, prompts)
    joined(plain, prompts)
    for _ in range(8):
        assert fused.step(5) == plain.step(5)
    base = [layer.qkv.clone() for layer in plain.layers]
    fused.set_adapters({})
    for layer, want in zip(fused.layers, base, strict=True):
        assert torch.equal(layer.qkv, want)
