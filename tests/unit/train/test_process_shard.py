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
