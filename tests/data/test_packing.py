"""Packer: fixed-length rows in reset / joint mode, overlong handling, utilisation, exact state."""
import json

import numpy as np
import pytest
import torch

from mindspeed_vita.config.schema import ConfigError, DataConfig
from mindspeed_vita.data.packing import Packer, PackingStats, packer_for, stack_rows
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.data.types import IGNORE_INDEX, RenderedSample

PAD = 0
CONTEXT = 7  # the visual context token id of these fake samples
TOKENS_PER_UNIT = 4


def make_sample(line, length, units=0, source="src"):
    """Distinct ids per sample; loss on the second half; `units` visual units of 4 context
    tokens each placed after a 2-token prefix."""
    ids = torch.arange(length, dtype=torch.int64) % 50 + 100 + line
    for u in range(units):
        start = 2 + u * (TOKENS_PER_UNIT + 1)
        ids[start:start + TOKENS_PER_UNIT] = CONTEXT
    labels = ids.clone()
    labels[: length // 2] = IGNORE_INDEX
    pixels = torch.full((units, 3, 2, 2), float(line)) + torch.arange(units).view(-1, 1, 1, 1) / 100
    return RenderedSample(source=source, line=line, input_ids=ids, labels=labels, pixel_values=pixels)


def pack_all(packer, samples):
    rows = []
    for position, sample in enumerate(samples):
        packer.add(position, sample)
        while (row := packer.pop()) is not None:
            rows.append(row)
    packer.flush()
    while (row := packer.pop()) is not None:
        rows.append(row)
    return rows


def check_reset_row(row, by_key, seq_length, multiple):
    """Plain re-derivation of a reset-mode row from its samples."""
    tokens, labels, positions = row.tokens[0], row.labels[0], row.position_ids[0]
    assert tokens.shape == (seq_length,) and row.cu_seqlens.dtype == torch.int32
    bounds = row.cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == seq_length and bounds == sorted(bounds)
    segments = list(zip(bounds[:-1], bounds[1:]))
    assert len(segments) in (len(row.samples), len(row.samples) + 1)
    for (start, end), key in zip(segments, row.samples):
        sample = by_key[key]
        n = sample.num_tokens
        assert (end - start) % multiple == 0 and n <= end - start < n + multiple
        assert torch.equal(tokens[start:start + n], sample.input_ids)
        assert torch.equal(labels[start:start + n], sample.labels)
        assert (tokens[start + n:end] == PAD).all() and (labels[start + n:end] == IGNORE_INDEX).all()
        assert positions[start:end].tolist() == list(range(end - start))
    if len(segments) > len(row.samples):  # the tail padding is a segment of its own
        start, end = segments[-1]
        assert (tokens[start:] == PAD).all() and (labels[start:] == IGNORE_INDEX).all()
        assert positions[start:].tolist() == list(range(end - start))
    assert row.num_real_tokens == sum(by_key[k].num_tokens for k in row.samples)


def random_lengths(n, low, high, seed=0):
    return np.random.default_rng(seed).integers(low, high + 1, n).tolist()


@pytest.mark.parametrize("lookahead", [1, 3, 8])
def test_reset_rows_hold_every_sample_exactly_once(lookahead):
    samples = [make_sample(i, n) for i, n in enumerate(random_lengths(60, 1, 70))]
    by_key = {(s.source, s.line): s for s in samples}
    packer = Packer(128, mode="reset", pad_multiple=8, pad_id=PAD, lookahead=lookahead)
    rows = pack_all(packer, samples)
    for row in rows:
        check_reset_row(row, by_key, 128, 8)
    assert sorted(k for row in rows for k in row.samples) == sorted(by_key)
    stats = packer.stats
    assert (stats.rows, stats.samples, stats.slots) == (len(rows), 60, 128 * len(rows))
    assert stats.real_tokens == sum(s.num_tokens for s in samples)


def test_segment_multiple_can_be_smaller_than_the_row_multiple():
    samples = [make_sample(i, n) for i, n in enumerate(random_lengths(20, 1, 30, seed=1))]
    by_key = {(s.source, s.line): s for s in samples}
    rows = pack_all(Packer(64, mode="reset", pad_multiple=16, segment_multiple=4, pad_id=PAD), samples)
    for row in rows:
        check_reset_row(row, by_key, 64, 4)


def test_joint_rows_run_positions_on_and_lay_samples_back_to_back():
    samples = [make_sample(i, n) for i, n in enumerate(random_lengths(40, 1, 50, seed=2))]
    by_key = {(s.source, s.line): s for s in samples}
    rows = pack_all(Packer(96, mode="joint", pad_multiple=8, pad_id=PAD, lookahead=4), samples)
    for row in rows:
        assert row.cu_seqlens is None
        assert row.position_ids[0].tolist() == list(range(96))
        expected = torch.cat([by_key[k].input_ids for k in row.samples])
        n = expected.numel()
        assert torch.equal(row.tokens[0, :n], expected)
        assert torch.equal(row.labels[0, :n], torch.cat([by_key[k].labels for k in row.samples]))
        assert (row.tokens[0, n:] == PAD).all() and (row.labels[0, n:] == IGNORE_INDEX).all()
    assert sorted(k for row in rows for k in row.samples) == sorted(by_key)


def next_fit_reference(lengths, seq_length):
    """Sequential next-fit, written plainly: the expected rows of lookahead=1."""
    rows, row, free = [], [], seq_length
    for index, n in enumerate(lengths):
        if n > free:
            rows.append(row)
            row, free = [], seq_length
        row.append(index)
        free -= n
    rows.append(row)
    return rows


def test_lookahead_one_is_sequential_next_fit():
    lengths = random_lengths(50, 1, 40, seed=3)
    samples = [make_sample(i, n) for i, n in enumerate(lengths)]
    rows = pack_all(Packer(64, mode="joint", pad_id=PAD, lookahead=1), samples)
    assert [[line for _, line in row.samples] for row in rows] == next_fit_reference(lengths, 64)


def test_no_sample_waits_long():
    lengths = random_lengths(300, 1, 60, seed=4)
    samples = [make_sample(i, n) for i, n in enumerate(lengths)]
    rows = pack_all(Packer(128, mode="joint", pad_id=PAD, lookahead=8), samples)
    for index, row in enumerate(rows):
        lines = [line for _, line in row.samples]
        if index + 1 < len(rows):
            later = min(line for _, line in rows[index + 1].samples)
            assert max(lines) < later + 8 + 128  # bounded reordering
    first_of_row = [row.samples[0][1] for row in rows]
    assert first_of_row == sorted(first_of_row)  # each row starts with the oldest pending sample


def test_seq_length_must_be_a_multiple_of_pad_multiple():
    with pytest.raises(ValueError, match=r"seq_length \(100\).*pad_multiple \(16\)"):
        Packer(100, pad_multiple=16)
    with pytest.raises(ValueError, match="mode"):
        Packer(64, mode="flat")
    with pytest.raises(ValueError, match="on_overlong"):
        Packer(64, on_overlong="wrap")
    with pytest.raises(ValueError, match="segment_multiple"):
        Packer(64, mode="joint", segment_multiple=4)


def test_overlong_samples_are_dropped_and_counted():
    samples = [make_sample(0, 10), make_sample(1, 65), make_sample(2, 20), make_sample(3, 61)]
    packer = Packer(64, mode="reset", pad_multiple=8, pad_id=PAD, on_overlong="drop")
    rows = pack_all(packer, samples)  # 61 pads to 64: fits; 65 does not
    assert sorted(line for row in rows for _, line in row.samples) == [0, 2, 3]
    assert packer.stats.dropped_overlong == 1 and packer.stats.truncated_overlong == 0


def test_overlong_text_sample_is_truncated_to_the_row():
    packer = Packer(32, mode="reset", pad_multiple=8, pad_id=PAD, on_overlong="truncate")
    sample = make_sample(5, 50)
    rows = pack_all(packer, [sample])
    assert len(rows) == 1 and packer.stats.truncated_overlong == 1
    assert torch.equal(rows[0].tokens[0], sample.input_ids[:32])
    assert torch.equal(rows[0].labels[0], sample.labels[:32])
    assert rows[0].cu_seqlens.tolist() == [0, 32]


def test_truncation_never_splits_a_visual_unit():
    # units occupy ids [2,6) [7,11) [12,16) [17,21); a 14-token row would cut the third one
    sample = make_sample(9, 30, units=4)
    packer = Packer(14, mode="joint", pad_id=PAD, on_overlong="truncate",
                    context_token_ids=[CONTEXT], tokens_per_unit=TOKENS_PER_UNIT)
    rows = pack_all(packer, [sample])
    kept = rows[0].num_real_tokens
    assert kept == 12  # the cut moved back to the start of the unit that did not fit
    assert torch.equal(rows[0].tokens[0, :kept], sample.input_ids[:12])
    assert torch.equal(rows[0].pixel_values, sample.pixel_values[:2])
    assert int((rows[0].tokens[0] == CONTEXT).sum()) == 2 * TOKENS_PER_UNIT


def test_truncating_pixels_needs_context_ids():
    packer = Packer(16, mode="joint", on_overlong="truncate")
    with pytest.raises(ValueError, match="context_token_ids"):
        packer.add(0, make_sample(1, 30, units=2))


def test_pixel_values_follow_the_samples_in_row_order():
    samples = [make_sample(0, 20, units=2), make_sample(1, 10), make_sample(2, 25, units=3)]
    rows = pack_all(Packer(64, mode="reset", pad_multiple=2, pad_id=PAD), samples)
    assert len(rows) == 1
    by_line = {s.line: s for s in samples}
    expected = torch.cat([by_line[line].pixel_values for _, line in rows[0].samples])
    assert torch.equal(rows[0].pixel_values, expected) and rows[0].pixel_values.shape[0] == 5


def test_utilisation_at_16k_on_synthetic_lengths():
    rng = np.random.default_rng(0)
    n = 1500
    # a mix like the synthetic dataset: short text, single images (1-3 tiles of 256), videos
    lengths = np.where(rng.random(n) < 0.6, rng.integers(300, 1200, n), rng.integers(1200, 3001, n))
    stats = {}
    for lookahead in (1, 8):
        packer = Packer(16384, mode="reset", pad_multiple=16, pad_id=PAD, lookahead=lookahead)
        for position, length in enumerate(lengths.tolist()):
            packer.add(position, RenderedSample("s", position, torch.ones(length, dtype=torch.int64),
                                                torch.ones(length, dtype=torch.int64), torch.zeros(0, 3, 4, 4)))
            while packer.pop() is not None:
                pass
        stats[lookahead] = packer.stats
    print({k: round(v.utilisation, 4) for k, v in stats.items()})
    assert stats[8].utilisation >= 0.95
    assert stats[8].utilisation > stats[1].utilisation  # the lookahead is what gets us there
    assert stats[8].real_tokens / stats[8].slots == stats[8].utilisation


def test_stats_dictionary():
    stats = PackingStats(rows=2, samples=5, real_tokens=96, slots=128)
    assert stats.as_dict()["utilisation"] == 0.75 and PackingStats().utilisation == 0.0


@pytest.mark.parametrize("mode", ["reset", "joint"])
@pytest.mark.parametrize("cut", [0, 1, 17, 39])
def test_state_round_trip_continues_exactly(mode, cut):
    samples = [make_sample(i, n, units=i % 2) for i, n in enumerate(random_lengths(40, 12, 64, seed=5))]
    samples[20] = make_sample(20, 64)  # a sample that fills a row alone
    settings = dict(mode=mode, pad_multiple=8, pad_id=PAD, lookahead=5)
    reference = pack_all(Packer(64, **settings), samples)

    first = Packer(64, **settings)
    rows = []
    for position in range(cut):
        first.add(position, samples[position])
        if position % 3 == 0:  # leave some finished rows unread at the cut
            while (row := first.pop()) is not None:
                rows.append(row)
    state = json.loads(json.dumps(first.state_dict()))  # serialisable as plain JSON
    second = Packer(64, **settings)
    second.load_state_dict(state, fetch=lambda position: samples[position])
    assert second.stats == first.stats
    for position in range(cut, len(samples)):
        second.add(position, samples[position])
    second.flush()
    while (row := second.pop()) is not None:
        rows.append(row)
    assert len(rows) == len(reference)
    for got, want in zip(rows, reference):
        assert got.samples == want.samples
        for name in ("tokens", "labels", "position_ids", "pixel_values"):
            assert torch.equal(getattr(got, name), getattr(want, name))
        assert (got.cu_seqlens is None and want.cu_seqlens is None) or torch.equal(got.cu_seqlens, want.cu_seqlens)


def test_state_from_other_settings_is_refused():
    state = Packer(64, pad_multiple=8).state_dict()
    with pytest.raises(ValueError, match="seq_length=64.*seq_length=128"):
        Packer(128, pad_multiple=8).load_state_dict(state, fetch=lambda p: None)


def test_stack_rows_rebases_cu_seqlens():
    samples = [make_sample(i, n) for i, n in enumerate([20, 30, 40, 10])]
    rows = pack_all(Packer(64, mode="reset", pad_multiple=2, pad_id=PAD, lookahead=1), samples)
    assert [r.cu_seqlens.tolist() for r in rows] == [[0, 20, 50, 64], [0, 40, 50, 64]]
    stacked = stack_rows(rows)
    assert stacked.tokens.shape == (2, 64)
    assert stacked.cu_seqlens.tolist() == [0, 20, 50, 64, 104, 114, 128]
    assert stacked.samples == rows[0].samples + rows[1].samples
    assert stacked.num_real_tokens == 100


@pytest.mark.parametrize("tp, cp, sp, packing, row, segment", [
    (8, 1, False, "reset", 1, 1), (8, 1, True, "reset", 8, 1), (8, 2, True, "reset", 32, 4),
    (8, 8, False, "joint", 16, 1), (1, 4, False, "reset", 8, 8),
])
def test_packer_for_takes_the_multiples_of_the_layout(tp, cp, sp, packing, row, segment):
    layout = ParallelLayout(tp=tp, cp=cp, sequence_parallel=sp)
    data = DataConfig(seq_length=256, packing=packing, pack_lookahead=3, on_overlong="truncate")
    packer = packer_for(layout, data, pad_id=PAD, tokens_per_unit=4)
    assert (packer.pad_multiple, packer.segment_multiple) == (row, segment)
    assert (packer.mode, packer.lookahead, packer.on_overlong) == (packing, 3, "truncate")
    assert (packer.pad_id, packer.tokens_per_unit, packer.seq_length) == (PAD, 4, 256)


def test_packer_for_refuses_a_row_the_layout_cannot_split():
    with pytest.raises(ConfigError, match=r"'data.seq_length' = 100 is not divisible by "
                                          r"2 \* 'parallel.cp' = 8"):
        packer_for(ParallelLayout(cp=4), DataConfig(seq_length=100), pad_id=PAD)


def test_reset_samples_of_a_cp_layout_can_all_be_split():
    """Every packed sample (and the tail padding segment) is a multiple of 2 * cp."""
    layout = ParallelLayout(cp=2)
    samples = [make_sample(i, n) for i, n in enumerate((5, 9, 1, 13, 7, 22))]
    rows = pack_all(packer_for(layout, DataConfig(seq_length=64), pad_id=PAD), samples)
    for row in rows:
        bounds = row.cu_seqlens.tolist()
        assert all((b - a) % layout.segment_multiple == 0 for a, b in zip(bounds, bounds[1:]))
