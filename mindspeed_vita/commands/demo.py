"""`mindspeed-vita demo`: flags (the demo itself is `mindspeed_vita.demo.run`)."""

from __future__ import annotations

from mindspeed_vita.commands.argtypes import add_backend_argument, output_dir, positive_int


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita demo`."""
    parser.add_argument(
        "--out",
        type=output_dir,
        default="demo_out",
        help="output directory (created if missing; must not be a file)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None,
        help="optimizer steps of every stage (default: each demo config's training.train_iters)"
    )
    parser.add_argument(
        "--seq-length", type=positive_int, default=None,
        help="packed row length of every stage (default: each demo config's data.seq_length)"
    )
    parser.add_argument(
        "--nproc", type=positive_int, default=2,
        help="processes per stage (torchrun; CP = nproc in stages 3-4, dp in 1-2; default 2)"
    )
    parser.add_argument(
        "--eval-images", type=positive_int, default=100,
        help="held-out images whose questions are evaluated (default 100: every held-out "
             "picture of the demo's data, ~290 questions, about 35 s)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=12,
        help="tokens to generate (inference.max_new_tokens)",
    )
    add_backend_argument(parser)


def run(args) -> int:
    """Run the demo; the first line comes before the slow imports (torch, megatron-core)."""
    print("[demo] importing torch and megatron-core", flush=True)
    from mindspeed_vita.demo.run import run as run_demo

    return run_demo(args)
