"""Flags that several `mindspeed-vita bench` commands share: one definition of each (type,
metavar, help wording), the per-command default and help detail passed in.

Standard library only, like `argtypes`: the commands' `--help` stays instant.
"""
from __future__ import annotations

from typing import List

from mindspeed_vita.commands.argtypes import positive_float, positive_int, positive_int_list


def add_seq_lengths_argument(parser, *, default: List[int]) -> None:
    """`--seq-length` of a benchmark that sweeps sequence lengths (comma-separated)."""
    shown = ",".join(str(n) for n in default)
    parser.add_argument("--seq-length", type=positive_int_list, default=default,
                        metavar="N[,N...]",
                        help=f"comma-separated sequence lengths in tokens (default {shown})")


def add_dtype_argument(parser, *, help: str) -> None:
    """`--dtype` of a benchmark that picks its compute dtype (default None: the benchmark
    chooses per backend)."""
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help=help)


def add_cp_sizes_argument(parser, *, help: str) -> None:
    """`--cp-sizes` of a benchmark that runs each CP size as that many gloo processes."""
    parser.add_argument("--cp-sizes", type=positive_int_list, default=[1, 2, 4],
                        metavar="CP[,CP...]", help=help)


def add_head_arguments(parser, *, heads: int, kv_heads: int) -> None:
    """`--heads`, `--kv-heads` and `--head-dim` (default 64): the attention shape timed."""
    parser.add_argument("--heads", type=positive_int, default=heads, help="query heads")
    parser.add_argument("--kv-heads", type=positive_int, default=kv_heads,
                        help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=positive_int, default=64, help="head dimension")


def add_spawn_arguments(parser, *, timeout: float, timeout_help: str) -> None:
    """`--timeout` and `--json`, the last flags of a benchmark whose work runs in processes
    spawned by `mindspeed_vita.bench.spawn` (`timeout`: the default seconds to wait)."""
    parser.add_argument("--timeout", type=positive_float, default=timeout, help=timeout_help)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
