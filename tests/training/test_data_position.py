"""The data position when a run resumes at another data-parallel size: the new ranks continue
the old run's global sample stream - every sample the old ranks had not trained on (held in
their packers, or below another rank's frontier) comes exactly once, none it trained on comes
again. Checked on the real DataPipeline / Packer with a mixture of unique records, through
chains of dp changes, ending at dp 1 and flushed so every consumed sample is emitted."""
import itertools
import os
import json

import pytest
import torch

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.loader import DataPipeline
from mindspeed_vita.data.mixture import MixtureConfig, MixtureStream
from mindspeed_vita.data.packing import Packer
from mindspeed_vita.data.stream_order import (
    OrderedStream, StreamOrder, continue_order, order_of)
from mindspeed_vita.data.types import IGNORE_INDEX, Message, RenderedSample, Sample

RECORDS = 400


def _parse(raw):
    return Sample(source=raw.source, line=raw.line, messages=[Message("user", raw.text)],
                  path=raw.path)


def _render(sample):
    record = json.loads(sample.messages[0].content)
    if record["id"] % 37 == 5:  # a few bad samples: they stay skipped, never carried
        raise DataError("corrupt_image", "cannot decode image", path="/media/broken.png")
    ids = torch.arange(record["len"], dtype=torch.int64) + record["id"]
    labels = ids.clone()
    labels[:2] = IGNORE_INDEX
    return RenderedSample(sample.source, sample.line, ids, labels, torch.zeros(0, 3, 2, 2))


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    with open(root / "text.jsonl", "w") as f:
        for i in range(RECORDS):
            f.write(json.dumps({"id": i, "len": 10 + (i * 37) % 90}) + "\n")
    (root / "mix.yaml").write_text("sources:\n  - {name: text, path: text.jsonl}\n")
    return MixtureStream(MixtureConfig.from_yaml(str(root / "mix.yaml")), seed=3)


def _pipelines(stream, order, dp_size):
    source = stream if order.plain else OrderedStream(stream, order)
    return [DataPipeline(source, stream.read, _parse, _render,
                         Packer(256, mode="reset", pad_multiple=8, pad_id=0, lookahead=4),
                         dp_rank=r, dp_size=dp_size) for r in range(dp_size)]


def _pull(pipeline, n):
    """Samples (line numbers) of the next `n` batches; the generator is left suspended."""
    return [line for batch in itertools.islice(iter(pipeline), n) for _, line in batch.samples]


def _run_chain(stream, chain):
    """`chain`: [(dp_size, [batches pulled per rank]), ...], the last dp_size 1. Returns every
    trained sample's stream position, and the skipped (rejected) positions."""
    position_of = {item.line_idx + 1: item.position
                   for item in stream.items(torch.arange(RECORDS).numpy())}
    order, trained, rejected = StreamOrder(), [], 0
    for dp_size, pulls in chain:
        pipelines = _pipelines(stream, order, dp_size)
        for pipeline, n in zip(pipelines, pulls):
            trained += _pull(pipeline, n)
        rejected += sum(sum(p.rejected.values()) for p in pipelines)
        states = [p.state_dict() for p in pipelines]
        order = continue_order(order, states)
    assert dp_size == 1
    last = pipelines[0]
    carried = len(order_of(last).carry)
    while last.consumed <= carried:  # past the carried samples: what it read is a stream prefix
        trained += _pull(last, 1)
    last.packer.flush()  # the end of the run: everything consumed is emitted
    while len(last.packer):
        trained += [line for _, line in last.packer.pop().samples]
    return [position_of[line] for line in trained], rejected


@pytest.mark.parametrize("chain", [
    [(2, [3, 2]), (1, [4])],           # DP 2 -> 1, ranks at different positions
    [(2, [3, 3]), (1, [5])],           # DP 2 -> 1 after equal steps, as the trainer runs
    [(1, [3]), (2, [2, 3]), (1, [3])],  # 1 -> 2 -> 1
    [(2, [2, 4]), (3, [1, 2, 3]), (1, [2])],  # orders compose
])
def test_no_sample_is_repeated_or_lost_across_dp_changes(stream, chain):
    positions, rejected = _run_chain(stream, chain)
    assert len(positions) == len(set(positions)), "a sample was trained twice"
    bad = {p for p in range(max(positions) + 1)
           if stream.item(p).line_idx % 37 == 5}  # id == line_idx here
    assert rejected == len(bad)
    assert sorted(set(positions) | bad) == list(range(max(positions) + 1)), "a sample was lost"
    assert len(positions) >= 30


def test_an_ordered_pipeline_resumes_exactly_at_the_same_dp(stream):
    first = _pipelines(stream, StreamOrder(), 2)
    for pipeline, n in zip(first, (3, 2)):
        _pull(pipeline, n)
    order = continue_order(StreamOrder(), [p.state_dict() for p in first])
    assert order.carry  # the held samples and rank 1's gap
    (running,) = _pipelines(stream, order, 1)
    _pull(running, 2)
    (resumed,) = _pipelines(stream, order, 1)
    resumed.load_state_dict(running.state_dict())
    expected = list(itertools.islice(iter(running), 3))
    got = list(itertools.islice(iter(resumed), 3))
    assert [b.samples for b in got] == [b.samples for b in expected]
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(got, expected))
    # another order is another stream: its state does not load
    (other,) = _pipelines(stream, StreamOrder(order.carry[1:], order.frontier), 1)
    with pytest.raises(ValueError, match="stream"):
        other.load_state_dict(running.state_dict())


def test_checkpoint_data_resume_at_the_same_and_at_another_dp(stream, tmp_path):
    """What the trainer reads from a checkpoint's data_dp files (`data_resume`) and puts into
    the new pipeline (`restore_data_position`): the own state at the same dp size; at another
    the carried order and the old run's skipped-sample counts, once (on dp rank 0); a stream
    of another mixture / seed is refused."""
    from types import SimpleNamespace

    from mindspeed_vita.errors import CheckpointError
    from mindspeed_vita.training import checkpointing as ckpt

    old = _pipelines(stream, StreamOrder(), 2)
    for pipeline, n in zip(old, (6, 5)):
        _pull(pipeline, n)
    rejected = sum(sum(p.rejected.values()) for p in old)
    assert rejected > 0  # the bad records of the fixture were met
    path = str(tmp_path / "iter_0000004")
    os.makedirs(path)
    with open(os.path.join(path, ckpt.TRAINING_FILE), "w") as f:
        json.dump({"format": ckpt.FORMAT, "layout": {"dp": 2}, "data_order": None}, f)
    for rank, pipeline in enumerate(old):
        torch.save(pipeline.state_dict(), os.path.join(path, ckpt.data_file(rank)))

    same = ckpt.data_resume(path, SimpleNamespace(dp_rank=1, dp_size=2))
    assert not same.dp_changed and same.order.plain
    (_, again) = _pipelines(stream, same.order, 2)
    ckpt.restore_data_position(path, again, SimpleNamespace(dp_rank=1), same)
    assert again.consumed == old[1].consumed and again.rejected == old[1].rejected

    other = ckpt.data_resume(path, SimpleNamespace(dp_rank=0, dp_size=1))
    assert other.dp_changed
    assert other.order == continue_order(StreamOrder(), [p.state_dict() for p in old])
    (fresh,) = _pipelines(stream, other.order, 1)
    ckpt.restore_data_position(path, fresh, SimpleNamespace(dp_rank=0), other)
    assert fresh.consumed == 0 and sum(fresh.rejected.values()) == rejected

    reseeded = MixtureStream(stream.config, seed=4)
    (elsewhere,) = _pipelines(reseeded, other.order, 1)
    with pytest.raises(CheckpointError, match="data.seed"):
        ckpt.restore_data_position(path, elsewhere, SimpleNamespace(dp_rank=0), other)
