"""`mindspeed-vita bench data`: flags (the benchmark is `mindspeed_vita.bench.data`)."""

from __future__ import annotations

from mindspeed_vita.commands.argtypes import (
    existing_dir,
    existing_file,
    non_negative_int,
    positive_int,
)

STAGES = (1, 2, 3, 4)


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita bench data`; a flag that sets a config value has its key's name."""
    parser.add_argument(
        "--seq-length", type=positive_int, default=16384, help="packed row length (data.seq_length)"
    )
    parser.add_argument(
        "--samples", type=positive_int, default=512, help="records to stream through the pipeline"
    )
    parser.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=0,
        help="loader processes that read and render (data.num_workers; default 0: this process)",
    )
    parser.add_argument(
        "--stage", type=int, default=2, choices=STAGES, help="which synthetic stage mixture"
    )
    parser.add_argument(
        "--data",
        type=existing_dir,
        default=None,
        help="a directory written by `mindspeed-vita data synth` (default: write one "
        "to a temporary directory)",
    )
    parser.add_argument(
        "--model-config",
        type=existing_file,
        default=None,
        help="model section YAML (default: Long-VITA-14B geometry, 448-pixel tiles, "
        "256 tokens each; configs/model/tiny.yaml renders far less)",
    )
    parser.add_argument(
        "--packing",
        choices=("reset", "joint"),
        default=None,
        help="data.packing (default: the paper's for the stage: reset 1-2, joint 3-4)",
    )
    parser.add_argument(
        "--pack-lookahead",
        type=positive_int,
        default=16,
        help="packer lookahead (data.pack_lookahead)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="samples per batch of the pad-to-longest baseline",
    )
    parser.add_argument(
        "--tokenizer",
        type=existing_dir,
        default=None,
        help="HF tokenizer directory (model.tokenizer; default: the tiny demo tokenizer)",
    )
    parser.add_argument("--seed", type=int, default=42, help="mixture order seed (data.seed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Run the benchmark (a line on stderr if its imports take more than 2 s)."""
    from mindspeed_vita.progress import notice_after

    with notice_after(2.0, "[bench data] importing torch and the data pipeline"):
        from mindspeed_vita.bench.data import run as run_benchmark
    return run_benchmark(args)
