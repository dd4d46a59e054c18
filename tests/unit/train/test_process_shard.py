"""Each DDP process gets a share of every step, even when the step was planned as one batch."""

from loralab.train.step import process_shard


def test_single_process_keeps_the_plan():
    plan = [[0, 1], [2, 3]]
    assert process_shard(plan, 0, 1) == plan


def test_one_planned_batch_is_split_over_processes():
    plan = [list(range(16))]
    shards = [process_shard(plan, k, 2) for k in range(2)]
    assert all(shards)
    assert sorted(i for s in shards for mb in s for i in mb) == list(range(16))


def test_more_batches_than_processes_are_dealt_out():
    plan = [[0], [1], [2], [3], [4]]
    assert process_shard(plan, 0, 2) == [[0], [2], [4]]
    assert process_shard(plan, 1, 2) == [[1], [3]]


def test_an_idle_process_joins_the_backward_with_zero_weight():
    """Process 1 of 2 gets no sequence of a 1-sequence step: it still runs a backward (DDP needs
    it), adds nothing to the gradient and reports no tokens."""
    import contextlib

    import torch

    from loralab.data.render import Example
    from loralab.train.step import accumulate_step

    class FakeAccelerator:
        process_index, num_processes, device = 1, 2, torch.device("cpu")

        def reduce(self, tensor, op):
            return tensor + 7  # the other process's labelled tokens

        def no_sync(self, module):
            return contextlib.nullcontext()

        def backward(self, loss):
            self.backwards = getattr(self, "backwards", 0) + 1
            loss.backward()

    weight = torch.nn.Parameter(torch.ones(()))

    def loss_module(input_ids, labels, **kwargs):
        return weight * 3.0, torch.tensor(5)

    acc = FakeAccelerator()
    example = Example(input_ids=[1, 2, 3], labels=[-100, 2, 3], record_index=1, truncated=0)
    stats = accumulate_step(acc, loss_module, [example], [[0]], pad_id=0)
    assert acc.backwards == 1
    assert weight.grad is not None and float(weight.grad) == 0.0
    assert (stats.loss_sum, stats.tokens, stats.seen_tokens) == (0.0, 0, 0)
