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


def test_processes_get_equal_tokens_not_the_longest_batch():
    """The plan sorts a step longest first: whole micro-batches would give process 0 the long
    sequences (and the whole job would wait for it); dealing by tokens evens the load."""
    plan = [[0, 1], [2, 3]]
    lengths = {0: 100, 1: 90, 2: 20, 3: 10}
    shards = [process_shard(plan, k, 2, lengths) for k in range(2)]
    assert shards == [[[0, 3]], [[1, 2]]]
    assert [sum(lengths[i] for mb in s for i in mb) for s in shards] == [110, 110]


def test_an_idle_process_runs_no_forward_and_counts_the_others_tokens():
    """Process 1 of 2 gets no sequence of a 1-sequence step: no forward, no gradient of its own
    (Dist.sum_gradients gives it zeros to add), and the step's figures are the job's."""
    import torch

    from loralab.data.render import Example
    from loralab.train.dist import Dist
    from loralab.train.step import accumulate_step

    class SecondOfTwo(Dist):
        def sum(self, values):
            return [v + 7 for v in values]  # what the other process adds

    calls = []

    def loss_module(input_ids, labels, **kwargs):
        calls.append(input_ids)
        return torch.tensor(3.0, requires_grad=True), torch.tensor(5)

    example = Example(input_ids=[1, 2, 3], labels=[-100, 2, 3], record_index=1, truncated=0)
    stats = accumulate_step(SecondOfTwo(rank=1, world=2), loss_module, [example], [[0]], pad_id=0)
    assert calls == []
    assert (stats.loss_sum, stats.tokens, stats.seen_tokens) == (7.0, 7, 7)
