"""DataPipeline: worker-count independence, exact resume, DP shards, rejections, strict mode."""
import collections
import itertools
import json
import logging

import pytest
import torch

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.config.schema import StageConfig
from mindspeed_vita.data.loader import DataPipeline, parse_record, pipeline_from_config
from mindspeed_vita.data.mixture import MixtureConfig, MixtureStream
from mindspeed_vita.data.packing import Packer
from mindspeed_vita.data.types import IGNORE_INDEX, Message, RenderedSample, Sample

BAD_LINE = "this is not json"


def fake_parse(raw):
    """JSON check only; the record text travels on as the user message."""
    try:
        json.loads(raw.text)
    except ValueError:
        raise DataError("invalid_json", "not a JSON line", path=raw.path, line=raw.line) from None
    return Sample(source=raw.source, line=raw.line, messages=[Message("user", raw.text)], path=raw.path)


def fake_render(sample):
    """Deterministic tokens from the record: `len` tokens, `units` 2x2 pixel units."""
    record = json.loads(sample.messages[0].content)
    if record.get("corrupt"):
        raise DataError("corrupt_image", "cannot decode image", path="/media/broken.png")
    if record.get("bug"):
        raise KeyError("renderer bug")
    length, units = record["len"], record.get("units", 0)
    ids = torch.arange(length, dtype=torch.int64) * 7 % 1000 + record["id"]
    labels = ids.clone()
    labels[: length // 3] = IGNORE_INDEX
    pixels = torch.full((units, 3, 2, 2), float(record["id"]))
    return RenderedSample(sample.source, sample.line, ids, labels, pixels)


@pytest.fixture
def mixture(tmp_path):
    """Two sources: 30 text records, and 16 image records with 2 bad lines and 1 corrupt image."""
    with open(tmp_path / "text.jsonl", "w") as handle:
        for i in range(30):
            handle.write(json.dumps({"id": i, "len": 20 + (i * 37) % 100}) + "\n")
    with open(tmp_path / "img.jsonl", "w") as handle:
        for i in range(16):
            if i in (3, 11):
                handle.write(BAD_LINE + "\n")
            else:
                handle.write(json.dumps({"id": 100 + i, "len": 30 + (i * 53) % 90, "units": 1 + i % 3,
                                         "corrupt": i == 7}) + "\n")
    (tmp_path / "mix.yaml").write_text("sources:\n"
                                       "  - {name: text, path: text.jsonl}\n"
                                       "  - {name: img, path: img.jsonl, ratio: 1.5}\n")
    return MixtureConfig.from_yaml(str(tmp_path / "mix.yaml"))


def make_pipeline(config, *, seed=11, num_workers=0, dp_rank=0, dp_size=1, strict=False, render=fake_render,
                  parse=fake_parse, **kwargs):
    stream = MixtureStream(config, seed=seed)
    packer = Packer(256, mode="reset", pad_multiple=8, pad_id=0, lookahead=4)
    return DataPipeline(stream, stream.read, parse, render, packer, dp_rank=dp_rank, dp_size=dp_size,
                        num_workers=num_workers, prefetch=2, strict=strict, **kwargs)


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.samples == b.samples
        for name in ("tokens", "labels", "position_ids", "pixel_values", "cu_seqlens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_output_is_identical_for_any_worker_count(mixture):
    runs = {n: list(itertools.islice(make_pipeline(mixture, num_workers=n), 12)) for n in (0, 1, 2)}
    assert_same_batches(runs[1], runs[0])
    assert_same_batches(runs[2], runs[0])
    again = list(itertools.islice(make_pipeline(mixture, num_workers=0), 12))
    assert_same_batches(again, runs[0])
    other_seed = list(itertools.islice(make_pipeline(mixture, seed=12), 12))
    assert [b.samples for b in other_seed] != [b.samples for b in runs[0]]


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_resume_yields_exactly_the_uninterrupted_batches(mixture, cut):
    total = 14
    uninterrupted = make_pipeline(mixture)
    batches, state = [], None
    for index, batch in enumerate(itertools.islice(uninterrupted, total)):
        batches.append(batch)
        if index + 1 == cut:
            state = json.loads(json.dumps(uninterrupted.state_dict()))  # a checkpoint is plain JSON
    assert state["packer"]["window"]  # samples pending in the packer must be rebuilt exactly
    resumed = make_pipeline(mixture, num_workers=2)
    resumed.load_state_dict(state)
    assert resumed.consumed == state["consumed"] and resumed.rejected == state["rejected"]
    assert_same_batches(list(itertools.islice(resumed, total - cut)), batches[cut:])
    assert resumed.stats() == uninterrupted.stats()


def test_breaking_out_and_iterating_again_continues(mixture):
    reference = list(itertools.islice(make_pipeline(mixture), 8))
    pipeline = make_pipeline(mixture, num_workers=1)
    first = list(itertools.islice(pipeline, 3))
    second = list(itertools.islice(pipeline, 5))
    assert_same_batches(first + second, reference)


def test_state_of_another_stream_is_refused(mixture):
    state = make_pipeline(mixture, seed=1).state_dict()
    with pytest.raises(ValueError, match="state has stream="):
        make_pipeline(mixture, seed=2).load_state_dict(state)
    state = make_pipeline(mixture, dp_rank=0, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="state has stream="):
        make_pipeline(mixture, dp_rank=1, dp_size=2).load_state_dict(state)


def test_dp_ranks_read_disjoint_shards_that_cover_the_stream(mixture):
    dp_size = 3
    stream = MixtureStream(mixture, seed=11)
    epoch = stream.items_per_epoch  # 30 + 24

    def record_key(item):
        raw = stream.read(item.source_idx, item.line_idx)
        return (raw.source, raw.line), raw.text

    positions_of_rank = []
    for rank in range(dp_size):
        pipeline = make_pipeline(mixture, dp_rank=rank, dp_size=dp_size)
        packed = []
        for batch in pipeline:
            packed.extend(batch.samples)
            if pipeline.consumed >= epoch // dp_size:
                break
        shard = stream.shard(rank, dp_size)
        held = [record_key(shard.item(p))[0] for p in pipeline.packer.held_positions()]
        good = [key for key, text in (record_key(shard.item(k)) for k in range(pipeline.consumed))
                if text != BAD_LINE and not json.loads(text).get("corrupt")]
        # exactly the good records of this rank's shard positions, each as often as it occurs
        assert collections.Counter(packed + held) == collections.Counter(good)
        positions_of_rank.append({shard.global_position(k) for k in range(pipeline.consumed)})
    for a, b in itertools.combinations(positions_of_rank, 2):
        assert not a & b
    assert set().union(*positions_of_rank) >= set(range(epoch))  # together: the whole first epoch
    text_in_epoch0 = [{record_key(stream.item(p))[0] for p in positions if p < epoch}
                      for positions in positions_of_rank]
    text_in_epoch0 = [{key for key in keys if key[0] == "text"} for keys in text_in_epoch0]
    assert sum(len(keys) for keys in text_in_epoch0) == 30  # ratio 1: every text record once
    for a, b in itertools.combinations(text_in_epoch0, 2):
        assert not a & b


def test_bad_samples_are_skipped_counted_and_logged(mixture, caplog):
    pipeline = make_pipeline(mixture, num_workers=2)
    stream = MixtureStream(mixture, seed=11)
    with caplog.at_level(logging.WARNING, logger="mindspeed_vita.data.loader"):
        batches = list(itertools.islice(pipeline, 20))
    expected = {"invalid_json": 0, "corrupt_image": 0}
    bad_locations = set()
    for k in range(pipeline.consumed):
        raw = stream.read(*stream.item(k)[2:])
        if raw.text == BAD_LINE:
            expected["invalid_json"] += 1
            bad_locations.add(f"{raw.path}:{raw.line}: not a JSON line")
        elif json.loads(raw.text).get("corrupt"):
            expected["corrupt_image"] += 1
            bad_locations.add(f"{raw.path}:{raw.line}: /media/broken.png: cannot decode image")
    assert expected["invalid_json"] > 0 and expected["corrupt_image"] > 0
    assert pipeline.rejected == expected
    assert pipeline.stats()["rejected"] == expected
    logged = {record.getMessage().split(": ", 1)[1] for record in caplog.records}
    assert logged == bad_locations
    packed = [key for batch in batches for key in batch.samples]
    assert all(key[0] in ("text", "img") for key in packed)


def test_strict_mode_fails_fast_with_file_and_line(mixture, tmp_path):
    pipeline = make_pipeline(mixture, strict=True, num_workers=1)
    with pytest.raises(DataError) as info:
        for _ in pipeline:
            pass
    error = info.value
    assert error.reason in ("invalid_json", "corrupt_image")
    assert error.path == str(tmp_path / "img.jsonl") and error.line in (4, 8, 12)
    assert str(error).startswith(f"{tmp_path / 'img.jsonl'}:{error.line}: ")


def test_a_renderer_bug_is_not_mistaken_for_bad_data(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": 0, "len": 10, "bug": True}) + "\n")
    (tmp_path / "mix.yaml").write_text("sources:\n  - {name: a, path: a.jsonl}\n")
    pipeline = make_pipeline(MixtureConfig.from_yaml(str(tmp_path / "mix.yaml")))
    with pytest.raises(KeyError) as info:
        next(iter(pipeline))
    assert any(f"{tmp_path / 'a.jsonl'}:1" in note for note in info.value.__notes__)


def test_a_mixture_of_only_bad_samples_stops_instead_of_spinning(tmp_path):
    (tmp_path / "a.jsonl").write_text(BAD_LINE + "\n" + BAD_LINE + "\n")
    (tmp_path / "mix.yaml").write_text("sources:\n  - {name: a, path: a.jsonl}\n")
    pipeline = make_pipeline(MixtureConfig.from_yaml(str(tmp_path / "mix.yaml")), max_consecutive_rejects=50)
    with pytest.raises(RuntimeError, match="50 samples in a row were rejected"):
        next(iter(pipeline))
    assert pipeline.rejected == {"invalid_json": 50}


def test_real_record_parser_feeds_the_pipeline(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    bad = {"messages": [{"role": "user", "content": "<image> what?"}, {"role": "assistant", "content": "x"}]}
    with open(tmp_path / "chat.jsonl", "w") as handle:
        for i in range(6):
            handle.write(json.dumps(bad if i == 2 else good) + "\n")
    (tmp_path / "mix.yaml").write_text("sources:\n  - {name: chat, path: chat.jsonl}\n")

    def render_chat(sample):
        text = "".join(m.content for m in sample.messages)
        ids = torch.tensor([ord(c) for c in text], dtype=torch.int64)
        return RenderedSample(sample.source, sample.line, ids, ids.clone(), torch.zeros(0, 3, 2, 2))

    config = MixtureConfig.from_yaml(str(tmp_path / "mix.yaml"))
    pipeline = make_pipeline(config, parse=parse_record, render=render_chat)
    batch = next(iter(pipeline))
    assert batch.samples and all(source == "chat" and line != 3 for source, line in batch.samples)
    stream = MixtureStream(config, seed=11)
    times_line_3_came = sum(stream.item(k).line_idx == 2 for k in range(pipeline.consumed))
    assert times_line_3_came >= 1 and pipeline.rejected == {"tag_count_mismatch": times_line_3_came}


def test_micro_batches_stack_rows(mixture):
    rows = list(itertools.islice(make_pipeline(mixture), 6))
    stacked = list(itertools.islice(make_pipeline(mixture, micro_batch_size=2), 3))
    assert all(batch.tokens.shape == (2, 256) for batch in stacked)
    for index, batch in enumerate(stacked):
        assert torch.equal(batch.tokens, torch.cat([rows[2 * index].tokens, rows[2 * index + 1].tokens]))
        assert batch.samples == rows[2 * index].samples + rows[2 * index + 1].samples


def test_pipeline_from_a_stage_config(mixture, tmp_path):
    stage = StageConfig.model_validate({
        "data": {"mixture": str(tmp_path / "mix.yaml"), "seq_length": 256, "packing": "reset", "seed": 11,
                 "num_workers": 0, "pack_lookahead": 4},
        "parallel": {"tp": 2, "cp": 2, "sequence_parallel": True},
        "training": {"micro_batch_size": 2, "global_batch_size": 4},
    })
    pipeline = pipeline_from_config(stage, render_fn=fake_render, pad_id=0, parse_fn=fake_parse)
    assert (pipeline.packer.pad_multiple, pipeline.packer.segment_multiple) == (8, 4)
    assert pipeline.packer.lookahead == 4 and pipeline.shard.stream.seed == 11
    batch = next(iter(pipeline))
    assert batch.tokens.shape == (2, 256)
    bounds = batch.cu_seqlens.tolist()
    assert bounds[-1] == 512 and all((b - a) % 4 == 0 for a, b in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError, match="'data.mixture' is not set"):
        pipeline_from_config(StageConfig(), render_fn=fake_render, pad_id=0)
