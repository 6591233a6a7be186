"""JsonlSource: byte-offset index of a JSONL file, random access, caching, memory."""
import os
import pickle
import tracemalloc

import numpy as np
import pytest

from mindspeed_vita.data import source_index
from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.source_index import JsonlSource, build_line_index

# blank lines (empty, lone "\r") in every position, CRLF endings, a whitespace-only line (a
# record: the parser rejects it), and no newline at the end
AWKWARD = (b'\n{"a": 1}\r\n\n\n{"b": "\xc3\xa9"}\n\r\n  \n{"c": 3}\n\n{"d": 4}')


def reference_records(data: bytes):
    """(line_no, text) of every non-blank line, the plain way."""
    out = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        text = line.rstrip(b"\r")
        if text:
            out.append((number, text.decode("utf-8-sig" if number == 1 else "utf-8")))
    return out


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 1 << 20])
def test_records_and_line_numbers_match_reference(tmp_path, chunk_bytes):
    path = tmp_path / "awkward.jsonl"
    path.write_bytes(AWKWARD)
    source = JsonlSource(str(path), cache_dir=str(tmp_path / "cache"), chunk_bytes=chunk_bytes)
    expected = reference_records(AWKWARD)
    assert len(source) == len(expected) == 5
    assert [source.read(i) for i in range(len(source))] == expected
    assert source.read(1) == (5, '{"b": "é"}')
    assert source.read(2) == (7, "  ")
    starts, blank_before = build_line_index(str(path), chunk_bytes=chunk_bytes)
    assert starts.tolist() == [1, 13, 27, 30, 40] and blank_before.tolist() == [0, 1, 1, 2, 4]


@pytest.mark.parametrize("data", [b"", b"\n\n", b"x", b"x\n", b"\r\n\r\nx\r\n", b"\xef\xbb\xbf{}\n{}"])
def test_edge_files(tmp_path, data):
    path = tmp_path / "edge.jsonl"
    path.write_bytes(data)
    source = JsonlSource(str(path), cache_dir=str(tmp_path / "c"), chunk_bytes=2)
    assert [source.read(i) for i in range(len(source))] == reference_records(data)


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text('{"x": 1}\n{"x": 2}\n')
    first = JsonlSource(str(path))
    assert os.path.isfile(tmp_path / ".data.jsonl.lines.npz")  # next to the file by default

    def must_not_scan(*args, **kwargs):
        raise AssertionError("the cached index should have been used")

    monkeypatch.setattr(source_index, "build_line_index", must_not_scan)
    second = JsonlSource(str(path))
    np.testing.assert_array_equal(first.line_starts, second.line_starts)

    monkeypatch.undo()
    path.write_text('{"x": 1}\n{"x": 2}\n{"x": 3}\n')  # new size -> stale cache
    third = JsonlSource(str(path))
    assert len(third) == 3 and third.read(2) == (3, '{"x": 3}')


def test_unwritable_cache_location_keeps_the_index_in_memory(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"x": 1}\n')
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    source = JsonlSource(str(path), cache_dir=str(blocker / "cache"))  # makedirs fails
    assert source.read(0) == (1, '{"x": 1}')
    assert not list(tmp_path.glob("**/*.npz"))


def test_corrupt_cache_is_ignored(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"x": 1}\n{"x": 2}\n')
    cache = tmp_path / ".data.jsonl.lines.npz"
    cache.write_bytes(b"garbage")
    source = JsonlSource(str(path))
    assert source.read(1) == (2, '{"x": 2}')


def test_bad_utf8_is_a_data_error_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"ok": 1}\n{"bad": "\xff"}\n')
    source = JsonlSource(str(path), cache_dir=str(tmp_path))
    with pytest.raises(DataError) as info:
        source.read(1)
    assert info.value.reason == "invalid_json"
    assert str(info.value).startswith(f"{path}:2: ")


def test_out_of_range_and_pickling(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"x": 1}\n{"x": 2}\n')
    source = JsonlSource(str(path), cache_dir=str(tmp_path))
    source.read(0)  # opens the descriptor, which must not travel
    with pytest.raises(IndexError, match="out of range"):
        source.read(2)
    clone = pickle.loads(pickle.dumps(source))
    assert clone._fd is None and clone.read(1) == (2, '{"x": 2}')


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlSource(str(tmp_path / "nope.jsonl"))


def test_memory_is_eight_bytes_per_record(tmp_path):
    n = 100_000
    path = tmp_path / "many.jsonl"
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(f'{{"i": {i}}}\n')
    file_size = os.path.getsize(path)
    chunk = 1 << 16
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        source = JsonlSource(str(path), cache_dir=str(tmp_path / "cache"), chunk_bytes=chunk)
        after_build, peak_build = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        texts = [source.read(i) for i in (0, n // 2, n - 1)]
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    retained = after_build - before
    print(f"file {file_size} B, {n} records: retained {retained} B ({retained / n:.2f} B/record), "
          f"build peak {peak_build - before} B, read peak {peak_read - after_build} B")
    assert texts[1] == (n // 2 + 1, f'{{"i": {n // 2}}}')
    assert retained < 8 * n + 32 * 1024  # the offsets and a constant, never the text
    # while building: the per-chunk parts plus their concatenation, and one chunk buffer
    assert peak_build - before < 2 * 8 * n + 12 * chunk + 256 * 1024
    assert peak_read - after_build < 16 * 1024
