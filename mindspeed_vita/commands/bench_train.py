"""`mindspeed-vita bench train`: flags (the benchmark is `mindspeed_vita.bench.train`)."""
from __future__ import annotations

from mindspeed_vita.commands.argtypes import (
    add_backend_argument, non_negative_int, positive_float, positive_int)
from mindspeed_vita.commands.bench_args import add_spawn_arguments


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita bench train`."""
    parser.add_argument("--stage", type=int, choices=(1, 2, 3, 4), default=2,
                        help="synthetic mixture whose samples are trained")
    parser.add_argument("--seq-length", type=positive_int, default=1024,
                        help="tokens per packed row (data.seq_length)")
    parser.add_argument("--micro-batch-size", type=positive_int, default=2,
                        help="packed rows per step (training.micro_batch_size); the padded runs "
                             "train the samples of those rows, one row each")
    parser.add_argument("--steps", type=positive_int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed steps per run before the timed ones")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help="constant learning rate of both optimizers (training.lr)")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed of the weights and of the data order")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads of the benchmark process (both sides share it)")
    add_backend_argument(parser)
    add_spawn_arguments(parser, timeout=3600.0,
                        timeout_help="seconds to wait for the benchmark process")


def run(args) -> int:
    """Run the benchmark."""
    from mindspeed_vita.bench.train import run as run_benchmark

    return run_benchmark(args)
