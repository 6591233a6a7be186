"""The host-side visual plan under context parallelism (no processes needed): every unit is
encoded by exactly one rank, per-rank encoder work is within one unit of even, and simulating the
all-to-all on the plans puts every feature row on the rank and row of its context token, for
units that straddle zigzag slices and ranks."""
import pytest
import torch

from mindspeed_vita.parallel.visual_exchange import assign_units, plan_visual_exchange

TPT = 4  # context tokens per unit


def zigzag_positions(b, s, cp, cu_seqlens=None):
    """Reference zigzag shard of flat positions [b, s] -> per rank [b, s / cp]: rank r keeps
    chunks r and 2cp-1-r of every row (joint) or of every packed sample (reset)."""
    flat = torch.arange(b * s)
    if cu_seqlens is None:
        segments = [(j * s, (j + 1) * s) for j in range(b)]
    else:
        segments = list(zip(cu_seqlens[:-1], cu_seqlens[1:]))
    shards = [[] for _ in range(cp)]
    for start, end in segments:
        chunks = flat[start:end].chunk(2 * cp)
        for r in range(cp):
            shards[r].append(torch.cat([chunks[r], chunks[2 * cp - 1 - r]]))
    return [torch.cat(parts).view(b, s // cp) for parts in shards]


def batch(b, s, spans, seed=0):
    """is_context [b, s] with context spans [(row, start, n_units)]."""
    is_context = torch.zeros(b, s, dtype=torch.bool)
    for row, start, n in spans:
        is_context[row, start:start + n * TPT] = True
    return is_context


def simulate(is_context, shards):
    """Run every rank's plan with feature value = the ordinal of the row; return, per rank, the
    values written at its local [s_local, b] rows and the expected ones (and the plans)."""
    cp = len(shards)
    plans = [plan_visual_exchange(is_context, shards, TPT, r) for r in range(cp)]
    ordinal = torch.full((is_context.numel(),), -1)
    ordinal[is_context.reshape(-1)] = torch.arange(int(is_context.sum()))
    features = [(p.units[:, None] * TPT + torch.arange(TPT)).reshape(-1) for p in plans]
    sent = [features[i][plans[i].send_index].split(list(plans[i].send_splits)) for i in range(cp)]
    out = []
    for j, plan in enumerate(plans):
        received = torch.cat([sent[i][j] for i in range(cp)])
        assert tuple(len(sent[i][j]) for i in range(cp)) == plan.recv_splits
        got = torch.full((shards[j].numel(),), -1)
        got[plan.context_rows] = received
        expected = ordinal[shards[j].t().reshape(-1)]  # sequence-major local rows
        out.append((got, expected))
    return plans, out


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("mode", ["joint", "reset"])
def test_rows_reach_their_tokens_and_work_is_balanced(cp, mode):
    b, s = 2, 64
    # 7 units: a 3-unit image over the first chunk boundaries of row 0, a 2-unit one at the
    # end of row 0, a 2-unit one in the middle of row 1 (straddling the middle chunks)
    is_context = batch(b, s, [(0, 2, 3), (0, 56, 2), (1, 28, 2)])
    cu = None if mode == "joint" else [0, 16, 48, 64, 64 + 40, 128]
    shards = zigzag_positions(b, s, cp, cu)
    plans, out = simulate(is_context, shards)
    for got, expected in out:
        assert torch.equal(got, expected)
    encoded = torch.cat([p.units for p in plans]).sort().values
    assert torch.equal(encoded, torch.arange(7))  # every unit exactly once
    counts = [p.units.numel() for p in plans]
    assert max(counts) - min(counts) <= 1
    assert all(p.units_per_rank == tuple(counts) for p in plans)


def test_cp1_plan_is_the_identity():
    is_context = batch(2, 32, [(0, 5, 2), (1, 0, 1)])
    shards = [torch.arange(64).view(2, 32)]
    plan = plan_visual_exchange(is_context, shards, TPT, 0)
    assert torch.equal(plan.units, torch.arange(3))
    assert torch.equal(plan.send_index, torch.arange(12))
    assert plan.send_splits == plan.recv_splits == (12,)


def test_a_unit_straddling_two_ranks_moves_rows_both_ways():
    # joint, cp 2, s 16: chunks of 4; one unit at positions 2..5 spans chunk 0 (rank 0) and
    # chunk 1 (rank 1): whichever rank encodes it must send rows to the other
    is_context = batch(1, 16, [(0, 2, 1)])
    plans, out = simulate(is_context, zigzag_positions(1, 16, 2))
    assert sum(p.send_splits[1 - r] for r, p in enumerate(plans)) == 2
    for got, expected in out:
        assert torch.equal(got, expected)


def test_assignment_stays_balanced_when_every_unit_prefers_one_rank():
    rows_held = torch.zeros(10, 4, dtype=torch.long)
    rows_held[:, 0] = 4
    owner = assign_units(rows_held)
    counts = torch.bincount(owner, minlength=4).tolist()
    assert sorted(counts) == [2, 2, 3, 3]
    assert counts[0] == 3  # the preferred rank takes its share (and one extra)


def test_assignment_follows_the_rows_when_balance_allows():
    rows_held = torch.tensor([[4, 0], [0, 4], [3, 1], [1, 3]])
    assert assign_units(rows_held).tolist() == [0, 1, 0, 1]
