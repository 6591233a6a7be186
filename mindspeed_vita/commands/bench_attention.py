"""`mindspeed-vita bench attention`: flags (the benchmark is `mindspeed_vita.bench.attention`)."""

from __future__ import annotations

from mindspeed_vita.commands.argtypes import (
    add_backend_argument,
    positive_float,
    positive_int,
)
from mindspeed_vita.commands.bench_args import (
    add_dtype_argument,
    add_head_arguments,
    add_seq_lengths_argument,
)


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita bench attention`."""
    add_seq_lengths_argument(parser, default=[2048, 4096, 8192, 16384])
    add_head_arguments(parser, heads=2, kv_heads=1)
    add_dtype_argument(parser, help="default: float32 on cpu, bfloat16 on accelerators")
    parser.add_argument("--forward-only", action="store_true", help="time forward passes only")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed repeats per point")
    parser.add_argument(
        "--naive-max-gb",
        type=positive_float,
        default=12.0,
        help="skip the naive baseline where its estimated peak exceeds this",
    )
    add_backend_argument(parser)
    parser.add_argument(
        "--attention-impl",
        default=None,
        choices=["auto", "torch", "flash_attn"],
        help="cuda backend kernels (config key 'backend_options.attention_impl'): "
        "PyTorch's flash kernels or the flash-attn package (default auto: "
        "flash-attn when installed); other backends ignore it",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Run the benchmark."""
    from mindspeed_vita.bench.attention import run as run_benchmark

    return run_benchmark(args)
