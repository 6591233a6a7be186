"""`mindspeed-vita bench prefill`: flags (the benchmark is `mindspeed_vita.bench.prefill`)."""
from __future__ import annotations

from mindspeed_vita.commands.argtypes import positive_float, positive_int, positive_int_list
from mindspeed_vita.commands.bench_args import add_cp_sizes_argument, add_spawn_arguments


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita bench prefill`."""
    parser.add_argument("--seq-length", type=positive_int, default=16384,
                        help="total prompt tokens for the per-rank memory at each CP size")
    add_cp_sizes_argument(parser,
                          help="CP sizes, each run as that many gloo processes (CP 1 always runs: "
                               "it is the baseline)")
    parser.add_argument("--lengths", type=positive_int_list,
                        default=[2048, 4096, 8192, 16384, 32768, 65536], metavar="N[,N...]",
                        help="prompt lengths tried for each head, shortest first")
    parser.add_argument("--budget-mib", type=positive_float, default=64.0,
                        help="peak memory growth a prefill may use, MiB")
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="measured prefills per point; the smallest peak counts")
    add_spawn_arguments(parser, timeout=3600.0,
                        timeout_help="seconds to wait for one group of processes")


def run(args) -> int:
    """Run the benchmark."""
    from mindspeed_vita.bench.prefill import run as run_benchmark

    return run_benchmark(args)
