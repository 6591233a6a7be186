"""`mindspeed-vita bench ring`: flags (the benchmark is `mindspeed_vita.bench.ring`)."""
from __future__ import annotations

from mindspeed_vita.commands.argtypes import positive_float, positive_int, positive_int_list


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita bench ring`."""
    parser.add_argument("--seq-length", type=positive_int, default=8192,
                        help="total tokens of the sequence, split over the CP ranks")
    parser.add_argument("--cp-sizes", type=positive_int_list, default=[1, 2, 4],
                        metavar="CP[,CP...]",
                        help="CP sizes, each run as that many gloo processes on the CPU "
                             "(CP 1 is always added: it is the memory baseline)")
    parser.add_argument("--heads", type=positive_int, default=4, help="query heads")
    parser.add_argument("--kv-heads", type=positive_int, default=2, help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=positive_int, default=64, help="head dimension")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed rounds per measurement; the fastest counts")
    parser.add_argument("--timeout", type=positive_float, default=1800.0,
                        help="seconds to wait for one CP size's processes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Run the benchmark."""
    from mindspeed_vita.bench.ring import run as run_benchmark

    return run_benchmark(args)
