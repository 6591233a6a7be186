"""The trainer's small rules: how a global batch's micro batches spread over dp ranks."""
from types import SimpleNamespace

from mindspeed_vita.training.trainer import _uneven_micro_batches, micro_batches_per_step


def _counts(global_batch, micro, dp):
    return [micro_batches_per_step(global_batch, micro, SimpleNamespace(dp_rank=r, dp_size=dp))
            for r in range(dp)]


def test_micro_batches_divide_evenly_when_they_can():
    assert _counts(8, 1, 2) == [4, 4]
    assert _counts(8, 2, 4) == [1, 1, 1, 1]
    assert _uneven_micro_batches(8, 2, 4) is None


def test_paper_global_batch_on_24_dp_ranks_gives_the_first_ranks_one_more():
    """540 rows on 24 dp ranks (192 devices, TP 8): 12 ranks run 23, 12 run 22; every micro
    batch of the global batch is run exactly once."""
    counts = _counts(540, 1, 24)
    assert counts == [23] * 12 + [22] * 12 and sum(counts) == 540
    note = _uneven_micro_batches(540, 1, 24)
    assert "dp ranks 0-11 run 23 per step, the others 22" in note
    assert "'training.global_batch_size'" in note


def test_every_split_covers_the_global_batch_once():
    for global_batch, micro in ((7, 1), (12, 3), (30, 2)):
        for dp in range(1, global_batch // micro + 1):
            counts = _counts(global_batch, micro, dp)
            assert sum(counts) * micro == global_batch and max(counts) - min(counts) <= 1
