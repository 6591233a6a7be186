"""Random access to the lines of a JSONL file without loading it: a byte-offset index.
(JSON-array files: `json_array.JsonArraySource`; `open_source` picks the reader of a file.)

The index holds one int64 start offset per record (8 bytes a line, the only per-line memory),
plus one int64 per *blank* line so that record `i` still reports its true 1-based line number.
It is built by scanning the file in binary chunks and cached on disk, keyed by the file's size
and modification time, so the next run (and every other rank) loads it instead of rescanning.

Blank lines (empty, or a lone "\\r") are not records; a line of spaces is a record (and will
be rejected by the parser as not JSON), so nothing is skipped silently except true blanks.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Dict, Optional, Tuple

import numpy as np

from mindspeed_vita.data.errors import DataError

_LOG = logging.getLogger(__name__)

#: bumped whenever the cache layout changes, so old caches are rebuilt rather than misread
_CACHE_VERSION = 1
_NEWLINE = 10
_CARRIAGE_RETURN = 13


class JsonlSource:
    """Line-indexed view of one JSONL file.

    `len(source)` is the number of records; `read(i)` returns `(line_no, text)` of record `i`
    by one positioned read. The object pickles without its file handle (each data-loader
    worker opens its own).

    Cache location: `cache_dir` when given (file named by a hash of the absolute path), else a
    hidden file next to the JSONL; when neither can be written the index stays in memory.
    Peak memory while building is about twice the final index plus one chunk buffer.
    """

    def __init__(self, path: str, *, cache_dir: Optional[str] = None, chunk_bytes: int = 1 << 22):
        self.path = os.path.abspath(path)
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        try:
            stat = os.stat(self.path)
        except OSError as error:
            raise FileNotFoundError(f"{self.path}: cannot open JSONL source ({error.strerror})") from None
        self._size = int(stat.st_size)
        self._mtime_ns = int(stat.st_mtime_ns)
        self._cache_dir = cache_dir
        self._chunk_bytes = int(chunk_bytes)
        self._fd: Optional[int] = None
        self._fd_pid: Optional[int] = None
        #: [n_records] int64 byte offset where each record starts
        self.line_starts: np.ndarray
        #: [n_blank_lines] int64: for every blank line, the number of records before it
        self.blank_before: np.ndarray
        index = self._load_or_build_index()
        self.line_starts, self.blank_before = index["line_starts"], index["blank_before"]

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.line_starts.shape[0])

    def line_number(self, index: int) -> int:
        """1-based line number in the file of record `index`."""
        index = self._check_index(index)
        blanks = int(np.searchsorted(self.blank_before, index, side="right"))
        return index + 1 + blanks

    def read(self, index: int) -> Tuple[int, str]:
        """`(line_no, text)` of record `index` (text without its line terminator).

        Raises `IndexError` outside `[0, len)` and `DataError("invalid_json")` when the bytes
        are not UTF-8 (a record that cannot be decoded cannot be JSON).
        """
        index = self._check_index(index)
        start = int(self.line_starts[index])
        # NOTE: the record ends where the next one starts; blank lines in between are only
        # line terminators, which rstrip removes.
        end = int(self.line_starts[index + 1]) if index + 1 < len(self) else self._size
        data = self._pread(start, end - start).rstrip(b"\r\n")
        line_no = self.line_number(index)
        try:
            # a UTF-8 byte-order mark can only sit at the very start of the file
            text = data.decode("utf-8-sig" if start == 0 else "utf-8")
        except UnicodeDecodeError as error:
            raise DataError("invalid_json", f"line is not UTF-8 (byte {error.start}: {error.reason})",
                            path=self.path, line=line_no) from None
        return line_no, text

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: record {index} out of range [0, {len(self)})")
        return index

    def _pread(self, offset: int, length: int) -> bytes:
        # NOTE: one descriptor per process (data-loader workers fork or unpickle this object);
        # os.pread keeps no file position, so concurrent readers never interfere.
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        chunks = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                raise OSError(f"{self.path}: file shrank while reading (offset {offset}); "
                              "was it modified during the run?")
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Close this process's file descriptor (reopened on the next read)."""
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._fd_pid = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        state["_fd_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, records={len(self)})"

    # ------------------------------------------------------------------------ index build
    #: file-name suffix of the on-disk index cache
    _CACHE_SUFFIX = ".lines.npz"

    def _cache_path(self) -> str:
        name = os.path.basename(self.path)
        if self._cache_dir is not None:
            key = hashlib.sha1(self.path.encode("utf-8")).hexdigest()[:16]
            return os.path.join(self._cache_dir, f"{key}-{name}{self._CACHE_SUFFIX}")
        return os.path.join(os.path.dirname(self.path), f".{name}{self._CACHE_SUFFIX}")

    def _build_index(self) -> Dict[str, np.ndarray]:
        """The index arrays of the file (what the cache stores), by name."""
        starts, blanks = build_line_index(self.path, chunk_bytes=self._chunk_bytes)
        return {"line_starts": starts, "blank_before": blanks}

    def _load_or_build_index(self) -> Dict[str, np.ndarray]:
        cache = self._cache_path()
        cached = self._load_cache(cache)
        if cached is not None:
            return cached
        index = self._build_index()
        self._write_cache(cache, index)
        return index

    def _meta(self) -> np.ndarray:
        return np.array([_CACHE_VERSION, self._size, self._mtime_ns], dtype=np.int64)

    def _load_cache(self, cache: str) -> Optional[Dict[str, np.ndarray]]:
        if not os.path.isfile(cache):
            return None
        try:
            with np.load(cache, allow_pickle=False) as data:
                if not np.array_equal(data["meta"], self._meta()):
                    return None  # the file changed since the index was written
                return {name: np.ascontiguousarray(data[name], dtype=np.int64)
                        for name in data.files if name != "meta"}
        except Exception as error:  # a truncated or foreign file: rebuild, never trust it
            _LOG.warning("%s: ignoring unreadable index cache %s (%s)", self.path, cache, error)
            return None

    def _write_cache(self, cache: str, index: Dict[str, np.ndarray]) -> None:
        # NOTE: written to a private temporary name and renamed, so ranks building the same
        # index at once never read a half-written file.
        tmp = f"{cache}.tmp{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(tmp, "wb") as handle:
                np.savez(handle, meta=self._meta(), **index)
            os.replace(tmp, cache)
        except OSError as error:
            _LOG.info("%s: index kept in memory (cannot write %s: %s)", self.path, cache, error)
            try:
                os.remove(tmp)
            except OSError:
                pass


def build_line_index(path: str, *, chunk_bytes: int = 1 << 22) -> Tuple[np.ndarray, np.ndarray]:
    """Scan `path` in binary chunks; return `(line_starts, blank_before)` (both int64).

    `line_starts[i]` is the byte offset of record i (non-blank lines, in file order);
    `blank_before[j]` is the number of records preceding the j-th blank line, so the line
    number of record i is `i + 1 + count(blank_before <= i)`.
    """
    start_parts = []
    blank_parts = []
    records_so_far = 0
    line_start = 0  # offset of the line currently open (not yet terminated)
    offset = 0  # file offset of the current chunk
    previous_last_byte = _NEWLINE  # byte before the chunk (a virtual "\n" before the file)
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            if not chunk:
                break
            data = np.frombuffer(chunk, dtype=np.uint8)
            ends = np.flatnonzero(data == _NEWLINE).astype(np.int64) + offset
            if ends.size:
                starts = np.empty_like(ends)
                starts[0] = line_start
                starts[1:] = ends[:-1] + 1
                lengths = ends - starts
                # a one-byte line is blank when that byte is "\r"; it sits just before its "\n",
                # which may be the first byte of this chunk (then it is the previous chunk's last)
                before_end = ends - 1 - offset
                byte_before = np.where(before_end >= 0, data[np.maximum(before_end, 0)], previous_last_byte)
                blank = (lengths == 0) | ((lengths == 1) & (byte_before == _CARRIAGE_RETURN))
                keep = ~blank
                start_parts.append(starts[keep])
                if blank.any():
                    # records before each blank line = records before the chunk + kept lines above it
                    kept_before = np.cumsum(keep) - keep
                    blank_parts.append(records_so_far + kept_before[blank])
                records_so_far += int(keep.sum())
                line_start = int(ends[-1]) + 1
            offset += len(chunk)
            previous_last_byte = int(data[-1])
    if line_start < offset:  # a last line without a terminating newline
        tail_is_blank = offset - line_start == 1 and previous_last_byte == _CARRIAGE_RETURN
        if tail_is_blank:
            blank_parts.append(np.array([records_so_far], dtype=np.int64))
        else:
            start_parts.append(np.array([line_start], dtype=np.int64))
    line_starts = np.concatenate(start_parts) if start_parts else np.zeros(0, dtype=np.int64)
    blank_before = np.concatenate(blank_parts) if blank_parts else np.zeros(0, dtype=np.int64)
    return line_starts.astype(np.int64, copy=False), blank_before.astype(np.int64, copy=False)


def open_source(path: str, *, cache_dir: Optional[str] = None,
                chunk_bytes: int = 1 << 22) -> JsonlSource:
    """The indexed reader of a data file: a `json_array.JsonArraySource` when the file is one
    JSON array (its first non-space byte is "["), else a `JsonlSource` (one record a line).
    Both read one record at a time; neither loads the file."""
    from mindspeed_vita.data.json_array import JsonArraySource, first_non_space_byte

    try:
        first = first_non_space_byte(path)
    except OSError as error:
        raise FileNotFoundError(f"{os.path.abspath(path)}: cannot open data file "
                                f"({error.strerror})") from None
    cls = JsonArraySource if first == ord("[") else JsonlSource
    return cls(path, cache_dir=cache_dir, chunk_bytes=chunk_bytes)
