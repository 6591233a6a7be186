"""`mindspeed-vita bench lm-head`: flags (the benchmark is `mindspeed_vita.bench.lm_head`)."""

from __future__ import annotations

from mindspeed_vita.commands.argtypes import (
    add_backend_argument,
    non_negative_int,
    positive_float,
    positive_int,
)
from mindspeed_vita.commands.bench_args import add_dtype_argument, add_seq_lengths_argument


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita bench lm-head`."""
    add_seq_lengths_argument(parser, default=[8192, 32768])
    parser.add_argument(
        "--vocab",
        type=positive_int,
        default=152064,
        help="vocabulary size (default 152064, padded Qwen2.5)",
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        default=256,
        help="hidden size (default 256 so a CPU host finishes; 5120 = Qwen2.5-14B)",
    )
    parser.add_argument(
        "--label-fraction",
        type=positive_float,
        default=0.25,
        help="fraction of rows that predict a label, in spans, in (0, 1]",
    )
    parser.add_argument(
        "--span-tokens",
        type=positive_int,
        default=512,
        help="typical length of one supervised answer span",
    )
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=4096,
        help="rows per chunk of the chunked head (default 4096 = model.lm_head_chunk_size)",
    )
    add_dtype_argument(
        parser, help="compute dtype (default: float32 on cpu, bfloat16 on accelerators)"
    )
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed repeats per point")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per point")
    parser.add_argument(
        "--memory-budget-gb",
        type=positive_float,
        default=64.0,
        help="memory budget for the longest-sequence estimate (default 64 GB, one Ascend 910B)",
    )
    parser.add_argument(
        "--max-estimate-gb",
        type=positive_float,
        default=16.0,
        help="skip a head at a length whose estimated peak exceeds this",
    )
    add_backend_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Run the benchmark."""
    from mindspeed_vita.bench.lm_head import run as run_benchmark

    return run_benchmark(args)
