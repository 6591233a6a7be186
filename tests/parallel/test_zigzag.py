"""Zigzag sharding: the chunk rule, per-sample splits, round trips, refusals, and the gather."""
import pytest
import torch
import torch.distributed as dist

from mindspeed_vita.parallel.zigzag import (ZigzagShard, zigzag_gather, zigzag_positions,
                                            zigzag_unshard)
from tests.dist_utils import run_distributed


def _plans(batch, seq_len, cp, cu=None):
    return [ZigzagShard.build(batch, seq_len, cp, r, cu) for r in range(cp)]


def test_joint_rank_keeps_chunks_r_and_mirror():
    # one row of 16 tokens, cp 2 -> 4 chunks of 4: rank 0 keeps chunks 0 and 3, rank 1 1 and 2
    tokens = torch.arange(16).view(1, 16)
    r0, r1 = _plans(1, 16, 2)
    assert r0.shard(tokens).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert r1.shard(tokens).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert r0.local_cu_seqlens == (0, 8) and not r0.packed


def test_joint_splits_every_row_alone():
    tokens = torch.arange(2 * 8).view(2, 8)
    r1 = _plans(2, 8, 2)[1]
    assert r1.shard(tokens).tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    rows, cols = r1.global_rows_cols()
    assert rows.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert cols.tolist() == [2, 3, 4, 5, 2, 3, 4, 5]


def test_reset_splits_every_sample_alone():
    # a row of 16 = samples of 4 (exactly 2*cp: one token per chunk), 8, and padding of 4
    cu = [0, 4, 12, 16]
    tokens = torch.arange(16).view(1, 16)
    r0, r1 = _plans(1, 16, 2, cu)
    assert r0.shard(tokens).tolist() == [[0, 3, 4, 5, 10, 11, 12, 15]]
    assert r1.shard(tokens).tolist() == [[1, 2, 6, 7, 8, 9, 13, 14]]
    assert r0.local_seqlens == (2, 4, 2) and r0.local_cu_seqlens == (0, 2, 6, 8)
    assert r0.packed and r0.seqlens == (4, 8, 4)


def test_reset_accepts_tensor_cu_seqlens_over_several_rows():
    cu = torch.tensor([0, 8, 16, 24, 32], dtype=torch.int32)
    plan = ZigzagShard.build(2, 16, 4, 3, cu)
    assert plan.local_seqlens == (2, 2, 2, 2)
    # rank 3 of cp 4 keeps chunks 3 and 4 of every sample of 8 (chunk = 1 token)
    assert plan.positions == (3, 4, 11, 12, 19, 20, 27, 28)


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("cu", [None, [0, 8, 40, 48, 64]])
def test_round_trip_and_partition(cp, cu):
    x = torch.randn(2, 32, 3)
    plans = _plans(2, 32, cp, cu)
    shards = [p.shard(x) for p in plans]
    assert all(s.shape == (2, 32 // cp, 3) for s in shards)
    torch.testing.assert_close(zigzag_unshard(shards, plans), x, rtol=0, atol=0)
    every = sorted(i for p in plans for i in p.positions)
    assert every == list(range(64))  # the shards partition the batch
    for p in plans:
        assert p.local_cu_seqlens[-1] == 64 // cp


def test_balanced_causal_work():
    # the point of the zigzag: every rank's causal work (sum of key counts per query) is equal
    s, cp = 64, 4
    work = []
    for p in _plans(1, s, cp):
        work.append(sum(c + 1 for c in p.positions))
    assert len(set(work)) == 1


@pytest.mark.parametrize("cu, match", [
    ([0, 6, 16], "packed sample 0 has 6 tokens, not a multiple of 2 \\* cp = 4"),
    ([0, 8, 12], "ends at 12 but the batch holds 16"),
    ([4, 16], "must start with 0"),
])
def test_bad_segments_refused(cu, match):
    with pytest.raises(ValueError, match=match):
        ZigzagShard.build(1, 16, 2, 0, cu)


def test_bad_joint_length_and_rank_refused():
    with pytest.raises(ValueError, match="sequence length 12 is not a multiple of 2 \\* cp = 8"):
        ZigzagShard.build(1, 12, 4, 0)
    with pytest.raises(ValueError, match="cp_rank 2 is not in a context-parallel group of 2"):
        ZigzagShard.build(1, 16, 2, 2)


def test_wrong_shape_refused():
    plan = ZigzagShard.build(1, 16, 2, 0)
    with pytest.raises(ValueError, match="expects a \\[1, 16, ...\\] tensor"):
        plan.shard(torch.zeros(1, 8))


def test_positions_helper_matches_plan():
    assert zigzag_positions((8,), 2, 1) == (2, 3, 4, 5)


def _gather_body(rank, world_size):
    # the group is started here rather than by run_distributed, whose teardown imports
    # megatron (seconds of CPU per process) that this test never uses
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        return _gather_both_modes(rank, world_size)
    finally:
        dist.destroy_process_group()


def _gather_both_modes(rank, world_size):
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 16, 1).expand(2, 16, 2).contiguous()
    gathered = []
    for cu in (None, [0, 4, 16, 32]):  # joint, reset
        plan = ZigzagShard.build(2, 16, world_size, rank, cu)
        gathered.append(zigzag_gather(plan.shard(x), plan))
    return gathered


def test_gather_reassembles_across_processes():
    results = run_distributed(_gather_body, world_size=2, init_process_group=False)
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 16, 1).expand(2, 16, 2)
    for per_rank in results:
        for r in per_rank:
            torch.testing.assert_close(torch.as_tensor(r), x, rtol=0, atol=0)
