"""Random access to the elements of a JSON-array file without loading it: a byte-span index.

The Long-VITA release writes much of its training data as one JSON array per file
(`[{"messages": ...}, {"messages": ...}]`, often pretty-printed over many lines). Loading such a
file with `json.load` costs several times its size in Python objects on every data-loader
worker; instead the file is scanned once in binary chunks (vectorised with numpy: string
state from unescaped quotes, nesting depth from brackets outside strings) and the byte span
and starting line of every top-level element are kept: 24 bytes per element, cached on disk
like the JSONL line index (`source_index.JsonlSource`) and shared by every rank and worker.

Locations: a record's "line" is the 1-based line of the file on which its element starts,
so `file.json:LINE` in an error points an editor at the element; the message also names the
element's index.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.source_index import JsonlSource

_QUOTE, _BACKSLASH, _NEWLINE = 34, 92, 10
_OPEN = (91, 123)  # [ {
_CLOSE = (93, 125)  # ] }
_COMMA = 44
_WHITESPACE = (32, 9, 10, 13)


def first_non_space_byte(path: str, limit: int = 1 << 16) -> int:
    """The first byte of `path` that is not whitespace or a UTF-8 byte-order mark (-1 if none
    within `limit` bytes): `[` marks a JSON-array file."""
    with open(path, "rb") as handle:
        head = handle.read(limit)
    head = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    stripped = head.lstrip(b" \t\r\n")
    return stripped[0] if stripped else -1


class _Scan:
    """State of the chunked scan carried from one chunk to the next."""

    def __init__(self):
        self.in_string = False
        self.backslashes = 0  # length of the backslash run that ended the previous chunk
        self.depth = 0
        self.newlines = 0
        self.seen_value = False  # the first non-space byte ("[") has been seen
        self.closed = False  # the array's closing bracket has been seen
        self.pending = False  # an element boundary whose first non-space byte is still ahead
        self.boundaries = []  # chunks of boundary offsets: "[", depth-1 commas, "]"
        self.starts = []  # element start offsets (first non-space byte)
        self.lines = []  # their 1-based line numbers


def build_element_index(path: str, *, chunk_bytes: int = 1 << 22
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan the JSON-array file `path`; return `(starts, ends, lines)` (int64 arrays): byte
    offset of each top-level element's first byte, the offset of the comma or closing bracket
    after it, and the 1-based line on which it starts.

    Raises DataError("invalid_json") naming the file when the top level is not one array
    (another value, unbalanced brackets, text after the closing bracket, a truncated file, an
    empty element such as a trailing comma).
    """
    state = _Scan()
    offset = 0
    with open(path, "rb") as handle:
        if handle.read(3) == b"\xef\xbb\xbf":
            offset = 3  # a UTF-8 byte-order mark: skipped, offsets stay those of the file
        else:
            handle.seek(0)
        while True:
            chunk = handle.read(chunk_bytes)
            if not chunk:
                break
            _scan_chunk(np.frombuffer(chunk, dtype=np.uint8), offset, state, path)
            offset += len(chunk)
    if not state.closed:
        raise DataError("invalid_json", "the JSON array is not closed (truncated file?)",
                        path=path)
    bounds = np.concatenate(state.boundaries)
    starts = np.array(state.starts, dtype=np.int64)
    lines = np.array(state.lines, dtype=np.int64)
    # element k lies between boundary k and boundary k+1; "[ ]" has no element
    if len(starts) != len(bounds) - 1 and not (len(starts) == 0 and len(bounds) == 2):
        raise DataError("invalid_json", "malformed JSON array (an empty element: a doubled or "
                                        "trailing comma)", path=path)
    return starts, bounds[1:].astype(np.int64) if len(starts) else starts, lines


def _scan_chunk(data: np.ndarray, offset: int, state: _Scan, path: str) -> None:
    def fail(detail: str) -> DataError:
        return DataError("invalid_json", detail, path=path)

    n = len(data)
    index = np.arange(n, dtype=np.int64)
    # a byte is escaped when an odd run of backslashes precedes it (runs may span chunks)
    backslash = data == _BACKSLASH
    last_other = np.maximum.accumulate(np.where(backslash, -1, index))
    run_before = np.empty(n, dtype=np.int64)
    run_before[0] = state.backslashes
    run_before[1:] = index[:-1] - last_other[:-1]
    run_before[1:] += np.where(last_other[:-1] < 0, state.backslashes, 0)
    quote = (data == _QUOTE) & (run_before % 2 == 0)
    in_string = (np.cumsum(quote) + state.in_string) % 2 == 1  # an opening quote counts inside
    outside = ~in_string & ~quote
    opens = outside & np.isin(data, _OPEN)
    closes = outside & np.isin(data, _CLOSE)
    depth = state.depth + np.cumsum(opens.astype(np.int64) - closes.astype(np.int64))
    non_space = ~np.isin(data, _WHITESPACE)
    non_space_at = np.flatnonzero(non_space)
    if not state.seen_value and non_space_at.size:
        if data[non_space_at[0]] != _OPEN[0]:
            raise fail("not a JSON array (the file does not start with '[')")
        state.seen_value = True
    if (depth < 0).any():
        raise fail("unbalanced brackets in the JSON array")
    closing = np.flatnonzero(closes & (depth == 0))
    if state.closed and non_space_at.size or closing.size and (
            closing.size > 1 or non_space_at[-1] > closing[0]):
        raise fail("text after the end of the JSON array")
    array_open = opens & (depth == 1) & (index == (non_space_at[0] if non_space_at.size else -1))
    array_open &= not state.boundaries  # only the file's first "[" opens the array
    commas = outside & (data == _COMMA) & (depth == 1)
    bounds = np.flatnonzero(array_open | commas | (closes & (depth == 0)))
    newlines_upto = np.cumsum(data == _NEWLINE)
    # next non-space position at or after each index (n when none is left in this chunk)
    next_non_space = np.minimum.accumulate(np.where(non_space, index, n)[::-1])[::-1]
    is_close = closes & (depth == 0)

    def element_at(position: int) -> None:
        if commas[position]:
            raise fail("malformed JSON array (an empty element: a doubled comma)")
        if not is_close[position]:  # "[ ]": the gap before the closing bracket is no element
            state.starts.append(offset + position)
            state.lines.append(state.newlines + int(newlines_upto[position]) + 1)

    if state.pending and non_space_at.size:
        element_at(int(non_space_at[0]))
        state.pending = False
    for b in bounds.tolist():
        if is_close[b]:
            state.closed = True
            continue
        after = int(next_non_space[b + 1]) if b + 1 < n else n
        if after == n:
            state.pending = True
        else:
            element_at(after)
    if bounds.size:
        state.boundaries.append(bounds + offset)
    state.in_string = bool(in_string[-1])
    tail = n - 1 - int(last_other[-1])
    state.backslashes = tail + (state.backslashes if last_other[-1] < 0 else 0)
    state.depth = int(depth[-1])
    state.newlines += int(newlines_upto[-1])


class JsonArraySource(JsonlSource):
    """Element-indexed view of one JSON-array file, with `JsonlSource`'s interface:
    `len(source)`, `read(i) -> (line_no, text)` (one positioned read), `line_number(i)`."""

    _CACHE_SUFFIX = ".elements.npz"

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)

    def _build_index(self) -> Dict[str, np.ndarray]:
        starts, ends, lines = build_element_index(self.path, chunk_bytes=self._chunk_bytes)
        return {"line_starts": starts, "blank_before": np.zeros(0, np.int64),
                "element_ends": ends, "element_lines": lines}

    def _load_or_build_index(self) -> Dict[str, np.ndarray]:
        index = super()._load_or_build_index()
        self.element_ends = index["element_ends"]
        self.element_lines = index["element_lines"]
        return index

    def line_number(self, index: int) -> int:
        """1-based line of the file on which element `index` starts."""
        return int(self.element_lines[self._check_index(index)])

    def read(self, index: int) -> Tuple[int, str]:
        """`(line_no, text)` of element `index` (its JSON text, trailing whitespace removed)."""
        index = self._check_index(index)
        start, end = int(self.line_starts[index]), int(self.element_ends[index])
        data = self._pread(start, end - start).rstrip()
        line_no = self.line_number(index)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError("invalid_json", f"element {index} is not UTF-8 (byte {error.start}: "
                                            f"{error.reason})", path=self.path,
                            line=line_no) from None
        return line_no, text

    def __repr__(self) -> str:
        return f"JsonArraySource({self.path!r}, records={len(self)})"
