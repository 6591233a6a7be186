"""Argument types and shared flags of the command line, checked by argparse itself.

A bad value (zero or negative size, a directory where a file is expected, an unknown backend)
is then an argparse error, which `cli.main` prints as one line and exit 2 before any heavy
import. Importing this module costs nothing (standard library only).
"""

from __future__ import annotations

import argparse
import os
from typing import List

#: values of the `--backend` flag and of the config key `backend`
BACKENDS = ("auto", "npu", "cuda", "cpu")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int_list(text: str) -> List[int]:
    """Comma-separated integers >= 1, e.g. `2048,4096`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers (e.g. 2048,4096), got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return values


def existing_file(text: str) -> str:
    """A path to an existing regular file (a directory is named as such)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a file")
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def existing_dir(text: str) -> str:
    """A path to an existing directory."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a directory")
    return text


def existing_path(text: str) -> str:
    """A path to an existing file or directory."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


def output_dir(text: str) -> str:
    """A directory to write into: missing (created later) or a directory, never a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_backend_argument(parser) -> None:
    """`--backend`, the same on every command (config key `backend`)."""
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="compute backend (config key 'backend'); default: "
        "$MINDSPEED_VITA_BACKEND, else auto (NPU, then CUDA, then CPU)",
    )
