"""Mixture config loading/validation and the deterministic, resumable, shardable stream."""
import collections
import itertools
import tracemalloc

import numpy as np
import pytest

from mindspeed_vita.data.mixture import KeyedPermutation, MixtureConfig, MixtureStream, SourceSpec
from mindspeed_vita.errors import UserInputError


class LengthOnly:
    """A source reader stand-in that only knows its record count."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def config(*sources):
    return MixtureConfig.model_validate({"sources": list(sources)})


def take(iterator, n):
    return list(itertools.islice(iterator, n))


# ------------------------------------------------------------------------- permutation
@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_keyed_permutation_is_a_bijection(n):
    out = KeyedPermutation(n, key=7)(np.arange(n))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_keyed_permutation_looks_random():
    n = 10_000
    a = KeyedPermutation(n, key=1)(np.arange(n))
    b = KeyedPermutation(n, key=2)(np.arange(n))
    assert (a != b).mean() > 0.99  # another key, another order
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no trend with the index
    # every tenth of the output range is hit about equally by each tenth of the input
    counts = np.histogram2d(np.arange(n) // 1000, a // 1000, bins=10)[0]
    assert counts.min() > 60 and counts.max() < 140  # expectation 100


# ------------------------------------------------------------------------------ config
def write(tmp_path, text, name="mix.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_resolves_paths_from_its_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    path = write(tmp_path, "sources:\n"
                           "  - {name: a, path: d/a.jsonl, root: media, ratio: 0.5, num: 3}\n"
                           "  - {name: b, path: b.jsonl}\n")
    cfg = MixtureConfig.from_yaml(path)
    a, b = cfg.sources
    assert a.path == str(tmp_path / "d" / "a.jsonl") and a.media_root == str(tmp_path / "media")
    assert (a.ratio, a.num) == (0.5, 3)
    assert b.media_root == str(tmp_path) and (b.ratio, b.num) == (1.0, None)


@pytest.mark.parametrize("text, key, words", [
    ("sources:\n  - {name: a}\n", "sources[0].path", "Field required"),
    ("sources:\n  - {name: a, path: a.jsonl, ratio: -1}\n", "sources[0].ratio", "greater than or equal to 0"),
    ("sources:\n  - {name: a, path: a.jsonl, ratoi: 1}\n", "sources[0].ratoi", "unknown key"),
    ("sources:\n  - {name: a, path: a.jsonl}\n  - {name: a, path: a.jsonl}\n", "sources[1].name",
     "duplicate source name 'a' (also sources[0])"),
    ("sources:\n  - {name: a, path: a.jsonl, num: -2}\n", "sources[0].num", "greater than or equal to 0"),
    ("sources: []\n", "sources", "at least 1"),
    ("srcs: []\n", "srcs", "unknown key"),
    ("sources:\n  - {name: a, path: missing.jsonl}\n", "sources[0].path", "no such file"),
])
def test_yaml_errors_name_file_and_key(tmp_path, text, key, words):
    (tmp_path / "a.jsonl").write_text("{}\n")
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as info:
        MixtureConfig.from_yaml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and f"{key}: " in message and words in message, message


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(UserInputError, match="mix.yaml: a mixture must be a mapping"):
        MixtureConfig.from_yaml(path)


@pytest.mark.parametrize("ratio, num, length, expected", [
    (1.0, None, 10, 10), (0.29, None, 100, 29), (2.5, None, 4, 10), (0.5, 3, 10, 3), (0.0, None, 10, 0),
    (3.0, 7, 5, 7),
])
def test_source_count(ratio, num, length, expected):
    spec = SourceSpec(name="s", path="/x.jsonl", ratio=ratio, num=num)
    assert spec.count(length) == expected


# ------------------------------------------------------------------------------ stream
def small_stream(seed=3, epoch=0):
    cfg = config({"name": "wrap", "path": "/w.jsonl", "ratio": 2.5},
                 {"name": "part", "path": "/p.jsonl", "ratio": 0.5},
                 {"name": "off", "path": "/o.jsonl", "ratio": 0.0},
                 {"name": "capped", "path": "/c.jsonl", "num": 2})
    return MixtureStream(cfg, seed=seed, epoch=epoch,
                         sources=[LengthOnly(4), LengthOnly(10), LengthOnly(5), LengthOnly(6)])


def test_epoch_contents_follow_ratios():
    stream = small_stream()
    assert stream.counts == [10, 5, 0, 2] and stream.items_per_epoch == 17
    for epoch in range(3):
        items = stream.items(np.arange(epoch * 17, (epoch + 1) * 17))
        assert {it.epoch for it in items} == {epoch}
        per_source = collections.Counter(it.source_idx for it in items)
        assert per_source == {0: 10, 1: 5, 3: 2}
        wrap = collections.Counter(it.line_idx for it in items if it.source_idx == 0)
        assert set(wrap) == {0, 1, 2, 3} and sorted(wrap.values()) == [2, 2, 3, 3]  # 2.5 passes
        part = [it.line_idx for it in items if it.source_idx == 1]
        assert len(set(part)) == 5 and all(0 <= i < 10 for i in part)  # a subset, no repeats
    epoch_lines = [sorted(it.line_idx for it in stream.items(np.arange(e * 17, (e + 1) * 17)) if it.source_idx == 1)
                   for e in range(4)]
    assert len({tuple(lines) for lines in epoch_lines}) > 1  # the subset changes with the epoch


def test_stream_is_deterministic_and_seeded():
    a = [tuple(it) for it in take(small_stream(seed=3).iterate(), 60)]
    b = [tuple(it) for it in take(small_stream(seed=3).iterate(), 60)]
    c = [tuple(it) for it in take(small_stream(seed=4).iterate(), 60)]
    assert a == b and a != c
    orders = [[(source, line) for _, _, source, line in a[e * 17:(e + 1) * 17]] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]  # a new permutation each epoch


def test_item_iterate_and_resume_agree():
    stream = small_stream()
    full = take(stream.iterate(block=5), 50)
    assert [it.position for it in full] == list(range(50))
    assert [stream.item(k) for k in range(50)] == full
    for start in (0, 1, 16, 17, 33):
        assert take(stream.iterate(start=start, block=7), 50 - start) == full[start:]


def test_starting_epoch_equals_skipping_ahead():
    later = take(small_stream(epoch=2).iterate(), 20)
    skipped = take(small_stream(epoch=0).iterate(start=34), 20)
    def key(i):
        return (i.epoch, i.source_idx, i.line_idx)

    assert [key(i) for i in later] == [key(i) for i in skipped]


@pytest.mark.parametrize("dp_size", [1, 2, 3, 5])
def test_shards_are_disjoint_and_cover_the_stream(dp_size):
    stream = small_stream()
    n = 3 * stream.items_per_epoch
    global_positions = []
    for rank in range(dp_size):
        shard = stream.shard(rank, dp_size)
        local = take(shard.iterate(), -(-n // dp_size))
        assert [it.position for it in local] == list(range(len(local)))
        for k, it in enumerate(local):
            g = shard.global_position(k)
            assert stream.item(g)[1:] == it[1:]  # same epoch and record
            global_positions.append(g)
    assert sorted(global_positions)[:n] == list(range(n))
    assert len(set(global_positions)) == len(global_positions)


def test_shard_of_shard():
    stream = small_stream()
    inner = stream.shard(1, 2).shard(2, 3)  # global 1 + 2 * (2 + 3k)
    assert [inner.global_position(k) for k in range(3)] == [5, 11, 17]
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        stream.shard(2, 2)


def test_empty_mixture_is_rejected():
    cfg = config({"name": "a", "path": "/a.jsonl", "ratio": 0.0})
    with pytest.raises(ValueError, match="selects no records"):
        MixtureStream(cfg, seed=0, sources=[LengthOnly(10)])


def test_millions_of_items_cost_no_memory():
    cfg = config({"name": "big", "path": "/b.jsonl", "ratio": 1.5}, {"name": "other", "path": "/o.jsonl", "ratio": 0.1})
    tracemalloc.start()
    try:
        stream = MixtureStream(cfg, seed=42, sources=[LengthOnly(20_000_000), LengthOnly(30_000_000)])
        items = take(stream.iterate(start=25_000_000), 2048)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stream.items_per_epoch == 33_000_000
    assert peak < 4 * 1024 * 1024  # the iteration block only; nothing per stream item
    share = sum(it.source_idx == 0 for it in items) / len(items)
    assert 0.85 < share < 0.97  # expectation 30/33 = 0.909


def test_read_returns_text_and_location(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"k": 0}\n\n{"k": 1}\n')
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n  - {name: a, path: a.jsonl, root: media}\n")
    stream = MixtureStream(MixtureConfig.from_yaml(str(mix)), seed=0, cache_dir=str(tmp_path / "cache"))
    record = stream.read(0, 1)
    assert (record.text, record.line, record.source) == ('{"k": 1}', 3, "a")
    assert record.path == str(tmp_path / "a.jsonl") and record.root == str(tmp_path / "media")
    assert stream.describe() == [dict(name="a", records=2, ratio=1.0, num=None, items=2)]
    assert len(stream.fingerprint()) == 16
