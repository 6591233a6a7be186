"""`mindspeed-vita bench decode`: flags (the benchmark is `mindspeed_vita.bench.decode`)."""
from __future__ import annotations

from mindspeed_vita.commands.argtypes import positive_int, positive_int_list
from mindspeed_vita.commands.bench_args import add_spawn_arguments


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita bench decode`."""
    parser.add_argument("--contexts", type=positive_int_list, default=[4096, 16384, 32768],
                        metavar="N[,N...]", help="prompt lengths (tokens) to decode after")
    parser.add_argument("--cp", type=positive_int, default=2,
                        help="context-parallel size: that many gloo processes on the CPU")
    parser.add_argument("--new-tokens", type=positive_int, default=4,
                        help="decoded tokens timed per context and mode")
    add_spawn_arguments(parser, timeout=3600.0, timeout_help="seconds to wait for the processes")


def run(args) -> int:
    """Run the benchmark."""
    from mindspeed_vita.bench.decode import run as run_benchmark

    return run_benchmark(args)
