"""The one exception type of the data pipeline.

A bad sample is skipped and counted by `reason` (or fails the run in strict mode), so the
reason is a short stable key and the message always says which file and line to look at.
"""
from __future__ import annotations

from typing import Optional

from mindspeed_vita.errors import UserInputError

#: every reason a sample can be rejected for; counters and reports key on these strings
REASONS = frozenset(
    {
        "invalid_json",  # the line is not JSON
        "invalid_record",  # JSON, but not the record schema (types, keys, no assistant turn)
        "unknown_role",  # a turn whose role / from is none of the accepted names
        "missing_file",  # a media path that does not exist (or a frame directory without frames)
        "corrupt_image",  # an image file PIL cannot decode
        "corrupt_video",  # a video that cannot be opened, indexed or decoded (e.g. truncated)
        "tag_count_mismatch",  # number of <image>/<video> tags != number of paths
        "over_limit",  # more images / frames than the stage allows
        "too_long",  # more tokens than the sequence length
    }
)


class DataError(UserInputError):  # a ValueError: the CLI prints it as one line
    """A rejected sample: `reason` (one of `REASONS`), the file `path` and 1-based `line`.

    `str(error)` is ``"{path}:{line}: {detail}"`` (``"{path}: {detail}"`` when `line` is None),
    so it can be pasted into an editor. Media loaders raise with the media file as `path`;
    callers that know the JSONL record use `at()` to re-address the error to it.
    """

    def __init__(self, reason: str, detail: str, *, path: str = "", line: Optional[int] = None):
        if reason not in REASONS:
            raise ValueError(f"unknown DataError reason {reason!r}; expected one of {sorted(REASONS)}")
        self.reason = reason
        self.detail = detail
        self.path = str(path)
        self.line = line
        location = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{location}: {detail}")

    def at(self, path: str, line: Optional[int]) -> "DataError":
        """The same rejection addressed to a record (`path`:`line`), keeping this error's detail.

        The original location (e.g. the image file) stays in the detail text so nothing is lost.
        """
        detail = self.detail if not self.path or self.path == str(path) else f"{self.path}: {self.detail}"
        return DataError(self.reason, detail, path=path, line=line)

    def __reduce__(self):
        # NOTE: the default exception pickling re-calls the class with `self.args` (the message
        # only), which would fail in data-loader workers; rebuild from the fields instead.
        return (_rebuild, (self.reason, self.detail, self.path, self.line))


def _rebuild(reason: str, detail: str, path: str, line: Optional[int]) -> DataError:
    return DataError(reason, detail, path=path, line=line)
