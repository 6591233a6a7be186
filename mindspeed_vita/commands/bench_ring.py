"""`mindspeed-vita bench ring`: flags (the benchmark is `mindspeed_vita.bench.ring`)."""
from __future__ import annotations

from mindspeed_vita.commands.argtypes import positive_int
from mindspeed_vita.commands.bench_args import (
    add_cp_sizes_argument,
    add_head_arguments,
    add_spawn_arguments,
)


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita bench ring`."""
    parser.add_argument("--seq-length", type=positive_int, default=8192,
                        help="total tokens of the sequence, split over the CP ranks")
    add_cp_sizes_argument(parser,
                          help="CP sizes, each run as that many gloo processes on the CPU "
                               "(CP 1 is always added: it is the memory baseline)")
    add_head_arguments(parser, heads=4, kv_heads=2)
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed rounds per measurement; the fastest counts")
    add_spawn_arguments(parser, timeout=1800.0,
                        timeout_help="seconds to wait for one CP size's processes")


def run(args) -> int:
    """Run the benchmark."""
    from mindspeed_vita.bench.ring import run as run_benchmark

    return run_benchmark(args)
