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


_SPACE = b" \t\r\n"
#: bytes that matter to the structure; everything else is skipped in one vectorised pass
_SPECIAL = np.zeros(256, dtype=bool)
_SPECIAL[[_QUOTE, _BACKSLASH, _COMMA, *_OPEN, *_CLOSE]] = True


def _escaped(quotes: np.ndarray, backslashes: np.ndarray, carried: int) -> np.ndarray:
    """For each quote position, whether an odd run of backslashes ends just before it (a run
    touching the chunk start continues the `carried` backslashes of the previous chunk)."""
    if not backslashes.size:
        return np.full(quotes.shape, carried % 2 == 1) & (quotes == 0)
    # first position of the run each backslash belongs to
    new_run = np.ones(backslashes.shape, dtype=bool)
    new_run[1:] = backslashes[1:] != backslashes[:-1] + 1
    run_start = backslashes[np.maximum.accumulate(np.where(new_run, np.arange(len(new_run)), 0))]
    last = np.searchsorted(backslashes, quotes) - 1  # the backslash just before each quote
    valid = (last >= 0) & (backslashes[np.maximum(last, 0)] == quotes - 1)
    length = quotes - run_start[np.maximum(last, 0)]
    length = np.where(run_start[np.maximum(last, 0)] == 0, length + carried, length)
    length = np.where(valid, length, np.where(quotes == 0, carried, 0))
    return length % 2 == 1


def _scan_chunk(data: np.ndarray, offset: int, state: _Scan, path: str) -> None:
    """Advance the scan over one chunk. Only the positions of quotes, backslashes, brackets
    and commas are looked at after one pass over the bytes, so the cost is a few passes plus
    work proportional to those positions."""
    def fail(detail: str) -> DataError:
        return DataError("invalid_json", detail, path=path)

    raw = data.tobytes()
    n = len(raw)
    first = n - len(raw.lstrip(_SPACE))  # first non-space position (n: none)
    if not state.seen_value and first < n:
        if raw[first] != _OPEN[0]:
            raise fail("not a JSON array (the file does not start with '[')")
        state.seen_value = True
    if state.closed and first < n:
        raise fail("text after the end of the JSON array")
    special = np.flatnonzero(_SPECIAL[data])
    codes = data[special]
    quotes = special[codes == _QUOTE]
    real = quotes[~_escaped(quotes, special[codes == _BACKSLASH], state.backslashes)]
    structural = special[(codes != _QUOTE) & (codes != _BACKSLASH)]
    # a structural byte is outside strings when an even number of real quotes precedes it
    before = np.searchsorted(real, structural) + int(state.in_string)
    structural = structural[before % 2 == 0]
    kinds = data[structural]
    step = np.isin(kinds, _OPEN).astype(np.int64) - np.isin(kinds, _CLOSE).astype(np.int64)
    depth = state.depth + np.cumsum(step)
    if (depth < 0).any():
        raise fail("unbalanced brackets in the JSON array")
    at_top = (depth == 0) & (step < 0)  # the array's closing bracket
    if at_top.sum() > 1 or (at_top.any() and raw[int(structural[at_top][0]) + 1:].strip(_SPACE)):
        raise fail("text after the end of the JSON array")
    opening = (step > 0) & (depth == 1) & (structural == first) & (not state.boundaries)
    is_bound = opening | ((kinds == _COMMA) & (depth == 1)) | at_top
    bounds = structural[is_bound]
    bound_kinds = kinds[is_bound]
    close_at = int(structural[at_top][0]) if at_top.any() else -1
    newlines = np.flatnonzero(data == _NEWLINE)
    found = []  # chunk positions of the elements that start in this chunk

    def element_at(position: int) -> None:
        if raw[position] == _COMMA:
            raise fail("malformed JSON array (an empty element: a doubled comma)")
        found.append(position)

    if state.pending and first < n:
        state.pending = False
        if first != close_at:
            element_at(first)
    for b, kind in zip(bounds.tolist(), bound_kinds.tolist()):
        if kind in _CLOSE:
            state.closed = True
            continue
        rest = raw[b + 1:b + 1 + 4096]
        after = b + 1 + len(rest) - len(rest.lstrip(_SPACE))
        while after - b - 1 == len(rest) and after < n:  # a long run of spaces
            rest = raw[after:after + 4096]
            after += len(rest) - len(rest.lstrip(_SPACE))
        if after >= n:
            state.pending = True
        elif after == close_at:
            continue  # "[ ]" or a trailing comma: counted by build_element_index
        else:
            element_at(after)
    if found:
        positions = np.array(found, dtype=np.int64)
        state.starts.extend((positions + offset).tolist())
        state.lines.extend((state.newlines + np.searchsorted(newlines, positions) + 1).tolist())
    if bounds.size:
        state.boundaries.append(bounds.astype(np.int64) + offset)
    state.in_string = bool((int(state.in_string) + len(real)) % 2)
    trailing = n - len(raw.rstrip(b"\\"))
    state.backslashes = trailing + (state.backslashes if trailing == n else 0)
    if depth.size:
        state.depth = int(depth[-1])
    state.newlines += len(newlines)


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
