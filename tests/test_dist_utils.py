"""The multi-process test harness: results by value whatever their shape, failures reported
with the rank's traceback or exit code instead of a hang."""
import collections
import dataclasses
import os
import signal

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed

Pair = collections.namedtuple("Pair", "first second")


@dataclasses.dataclass(frozen=True)
class Report:
    name: str
    value: torch.Tensor
    extras: dict


def _sum_body(rank, world_size):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def test_results_come_back_in_rank_order():
    assert run_distributed(_sum_body, 2) == [3.0, 3.0]


def _nested_body(rank, world_size):
    x = torch.arange(6.0, requires_grad=True)
    y = x * (rank + 1)  # a non-leaf that still requires grad
    big = torch.zeros(1000)
    big[:3] = torch.tensor([1.0, 2.0, 3.0])
    dist.all_reduce(big)  # a collective, so the ranks exit at about the same time
    return {
        "pair": Pair(y, [big[:3], (torch.ones(2, dtype=torch.bfloat16) * rank,)]),
        "report": Report("r", torch.full((2, 2), float(rank)), {"inner": [Pair(x, None)]}),
        "ordered": collections.OrderedDict(a=torch.tensor([rank])),
        "plain": rank,
    }


def test_nested_tensors_arrive_by_value():
    """Tensors nested in namedtuples, dataclasses, dicts, lists and tuples come back as plain
    CPU tensors (detached, bf16 kept), the same containers around them."""
    for rank, out in enumerate(run_distributed(_nested_body, 2)):
        pair = out["pair"]
        assert isinstance(pair, Pair)
        assert torch.equal(pair.first, torch.arange(6.0) * (rank + 1))
        assert not pair.first.requires_grad
        assert torch.equal(pair.second[0], torch.tensor([2.0, 4.0, 6.0]))  # all-reduced
        assert pair.second[1][0].dtype == torch.bfloat16
        assert torch.equal(pair.second[1][0].float(), torch.full((2,), float(rank)))
        report = out["report"]
        assert isinstance(report, Report) and report.name == "r"
        assert torch.equal(report.value, torch.full((2, 2), float(rank)))
        inner = report.extras["inner"][0]
        assert isinstance(inner, Pair) and inner.second is None
        assert torch.equal(inner.first, torch.arange(6.0)) and not inner.first.requires_grad
        assert isinstance(out["ordered"], collections.OrderedDict)
        assert out["ordered"]["a"].tolist() == [rank] and out["plain"] == rank


def _crash_body(rank, world_size):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)  # dies like a segfault: no report, no traceback
    t = torch.zeros(1)
    dist.all_reduce(t)  # rank 0 blocks here forever waiting for rank 1
    return 0


def test_a_rank_that_dies_fails_the_test_with_its_exit_code():
    with pytest.raises(AssertionError) as error:
        run_distributed(_crash_body, 2, timeout=600)
    message = str(error.value)
    assert "rank 1 failed:\ndied without reporting: killed by signal SIGSEGV" in message
    assert "rank 0 failed:" in message  # gloo's error on the lost peer, or killed by us


def _exit_body(rank, world_size):
    if rank == 0:
        os._exit(3)  # leaves without running the worker's exception handler
    return rank


def test_a_rank_that_exits_early_is_named():
    with pytest.raises(AssertionError, match="rank 0 failed:\ndied without reporting: exit code 3"):
        run_distributed(_exit_body, 2, timeout=600)


def _raise_body(rank, world_size):
    if rank == 0:
        raise ValueError("bad thing on rank 0")
    t = torch.zeros(1)
    dist.all_reduce(t)  # blocked: rank 0 never joins
    return rank


def test_an_exception_fails_with_the_traceback_without_waiting_for_the_timeout():
    import time

    start = time.monotonic()
    with pytest.raises(AssertionError) as error:
        run_distributed(_raise_body, 2, timeout=600)
    message = str(error.value)
    assert "ValueError: bad thing on rank 0" in message and "Traceback" in message
    # rank 1 is either killed after the grace period or sees rank 0's group go away first
    # (gloo: "connection closed"); both are reported, neither waits for the 600 s timeout
    assert "rank 1 failed:" in message
    assert time.monotonic() - start < 300


def _unpicklable_body(rank, world_size):
    return lambda: rank  # cannot be serialised: reported, not lost in a queue thread


def test_an_unserialisable_result_is_reported():
    with pytest.raises(AssertionError, match="rank 0 failed:\nTraceback"):
        run_distributed(_unpicklable_body, 2, timeout=600)
