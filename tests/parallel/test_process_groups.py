"""ParallelGroups: the groups `initialize_parallel` returns are the ones megatron builds."""
import copy

import pytest

from mindspeed_vita.parallel.groups import ParallelGroups
from mindspeed_vita.parallel.layout import ParallelLayout
from tests.dist_utils import run_distributed

AXES = ("tp", "cp", "dp", "dp_cp", "pp")


def _fake_groups(layout, rank, **ranks):
    return ParallelGroups(layout=layout, rank=rank, **{axis: object() for axis in AXES},
                          **{f"{axis}_ranks": tuple(ranks[axis]) for axis in AXES})


def test_ranks_and_sizes_come_from_the_members():
    groups = _fake_groups(ParallelLayout(tp=2, cp=2), 3, tp=(2, 3), cp=(1, 3), dp=(3,),
                          dp_cp=(1, 3), pp=(3,))
    assert (groups.tp_rank, groups.tp_size, groups.cp_rank, groups.cp_size) == (1, 2, 1, 2)
    assert (groups.dp_rank, groups.dp_size, groups.dp_cp_rank, groups.dp_cp_size) == (0, 1, 1, 2)
    assert (groups.pp_rank, groups.pp_size, groups.world_size) == (0, 1, 4)
    assert copy.deepcopy(groups) is groups  # process groups are shared, never copied
    sp = groups.with_sequence_parallel(True)
    assert sp.sequence_parallel and not groups.sequence_parallel and sp.tp is groups.tp


def test_members_that_disagree_with_the_layout_are_refused():
    with pytest.raises(ValueError, match=r"tp group \(0,\) of rank 0 does not match the "
                                         r"layout's tp size 2"):
        _fake_groups(ParallelLayout(tp=2), 0, tp=(0,), cp=(0,), dp=(0,), dp_cp=(0,), pp=(0,))


def _groups_body(rank, world_size, layouts):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from backends import get_backend
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    def members(group):
        return tuple(dist.get_process_group_ranks(group))

    out = []
    for layout in layouts:
        groups = initialize_parallel(get_backend("cpu"), layout, seed=3)
        megatron = {"tp": members(ps.get_tensor_model_parallel_group()),
                    "cp": members(ps.get_context_parallel_group()),
                    "dp": members(ps.get_data_parallel_group()),
                    "dp_cp": members(ps.get_data_parallel_group(with_context_parallel=True)),
                    "pp": members(ps.get_pipeline_model_parallel_group())}
        ours = {axis: getattr(groups, f"{axis}_ranks") for axis in AXES}
        # the groups themselves work: a sum over each axis counts its members
        sums = {}
        for axis in AXES:
            import torch

            t = torch.ones(1)
            dist.all_reduce(t, group=getattr(groups, axis))
            sums[axis] = int(t.item())
        ranks = {axis: getattr(groups, f"{axis}_rank") for axis in AXES}
        out.append((ours, megatron, sums, ranks, groups.layout))
        ps.destroy_model_parallel()  # keep the default group for the next layout
    return out


# (layout, expected members of each group of each rank, megatron's order tp-cp-ep-dp-pp)
EXPECTED = [
    (ParallelLayout(tp=2, cp=2, sequence_parallel=True),
     {"tp": [(0, 1), (0, 1), (2, 3), (2, 3)], "cp": [(0, 2), (1, 3), (0, 2), (1, 3)],
      "dp": [(0,), (1,), (2,), (3,)], "dp_cp": [(0, 2), (1, 3), (0, 2), (1, 3)],
      "pp": [(0,), (1,), (2,), (3,)]}),
    (ParallelLayout(cp=2, dp=2),
     {"tp": [(0,), (1,), (2,), (3,)], "cp": [(0, 1), (0, 1), (2, 3), (2, 3)],
      "dp": [(0, 2), (1, 3), (0, 2), (1, 3)], "dp_cp": [(0, 1, 2, 3)] * 4,
      "pp": [(0,), (1,), (2,), (3,)]}),
]


def test_groups_at_world_size_4_equal_megatrons():
    layouts = [layout for layout, _ in EXPECTED]
    per_rank = run_distributed(_groups_body, world_size=4, args=(layouts,))
    for rank, results in enumerate(per_rank):
        for (layout, expected), (ours, megatron, sums, ranks, got_layout) in zip(EXPECTED,
                                                                                 results):
            assert got_layout == layout
            for axis in AXES:
                assert ours[axis] == megatron[axis] == expected[axis][rank], (layout, axis)
                assert sums[axis] == len(expected[axis][rank])
                assert ranks[axis] == expected[axis][rank].index(rank)


def test_a_layout_for_another_world_is_refused_before_any_group_starts(monkeypatch):
    import torch.distributed as dist

    from backends import get_backend
    from mindspeed_vita.errors import ConfigError
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # a plain `python` process: world size 1
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match=r"tp=2 \* pp=1 \* cp=2 \* dp=1 = 4 processes, but this "
                                          r"launch has world size 1"):
        initialize_parallel(get_backend("cpu"), ParallelLayout(tp=2, cp=2))
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        initialize_parallel(get_backend("cpu"), ParallelLayout())
    assert not dist.is_initialized()
