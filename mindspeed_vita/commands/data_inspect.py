"""`mindspeed-vita data inspect`: flags, output and exit status (the inspection itself is
`mindspeed_vita.data.inspect`).

Exit status: 0 when at least one sample is usable; 2 (one error line after the report) when
every record was rejected or there was none, and with `--strict` at the first rejected record.
"""

from __future__ import annotations

import os
from typing import Optional

from mindspeed_vita.commands.argtypes import (
    existing_dir,
    existing_file,
    non_negative_int,
    positive_int,
)

#: flags that override data.* keys of the inspected stage (same names as the keys)
DATA_OVERRIDES = (
    "seq_length",
    "packing",
    "seed",
    "max_images",
    "max_frames",
    "max_num_frame",
    "max_tiles",
)


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita data inspect`."""
    parser.add_argument(
        "input",
        metavar="CONFIG_OR_JSONL",
        type=existing_file,
        help="a stage YAML, a mixture YAML (key 'sources') or one JSONL file",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object, with a per-sample list"
    )
    parser.add_argument(
        "--tokenizer",
        type=existing_dir,
        default=None,
        help="HF tokenizer directory, e.g. your Qwen2.5 copy (model.tokenizer; "
        "default: the stage's, else the tiny demo tokenizer built in a "
        "temporary directory, whose token counts differ from Qwen2.5's)",
    )
    parser.add_argument(
        "--model-config",
        type=existing_file,
        default=None,
        help="model section YAML, e.g. configs/model/tiny.yaml (default: the stage's "
        "model, else Long-VITA-14B: 448-pixel tiles, 256 tokens each, 1..12 tiles)",
    )
    parser.add_argument(
        "--seq-length", type=positive_int, default=None, help="override data.seq_length"
    )
    parser.add_argument(
        "--packing", choices=("reset", "joint"), default=None, help="override data.packing"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="override data.seed (the stream order)"
    )
    parser.add_argument(
        "--max-images", type=non_negative_int, default=None, help="override data.max_images"
    )
    parser.add_argument(
        "--max-frames", type=non_negative_int, default=None, help="override data.max_frames"
    )
    parser.add_argument(
        "--max-num-frame", type=positive_int, default=None, help="override data.max_num_frame"
    )
    parser.add_argument(
        "--max-tiles", type=positive_int, default=None, help="override data.max_tiles"
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="inspect only the first N records of the epoch's stream",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 2) on the first rejected record, naming its file:line",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="decode every image and video (slow; also finds damage past the headers)",
    )
    parser.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=0,
        help="processes that read and render records (data.num_workers; default 0: this one)",
    )
    parser.add_argument(
        "--no-samples",
        action="store_true",
        help="leave the per-sample list out of --json (for very large mixtures)",
    )


def run(args) -> int:
    """Entry point of `mindspeed-vita data inspect`."""
    import tempfile

    from mindspeed_vita.errors import UserInputError
    from mindspeed_vita.progress import notice_after

    overrides = {key: getattr(args, key) for key in DATA_OVERRIDES}
    with tempfile.TemporaryDirectory(prefix="mindspeed-vita-inspect-") as scratch:
        with notice_after(2.0, "[inspect] importing torch, reading the config and the tokenizer"):
            from mindspeed_vita.bench.common import print_json
            from mindspeed_vita.data.inspect import format_report, inspect_mixture, resolve_target

            target = resolve_target(
                args.input, model_config=args.model_config, data_overrides=overrides
            )
            tokenizer_path = args.tokenizer or target.stage.model.tokenizer
            tokenizer, description = _tokenizer_for(tokenizer_path, scratch)
        report = inspect_mixture(
            target,
            tokenizer,
            limit=args.limit,
            strict=args.strict,
            decode=args.decode,
            workers=args.num_workers,
            show_progress=True,
            keep_samples=args.json and not args.no_samples,
        )
    report["input"] = os.path.abspath(args.input)
    report["tokenizer"] = {"path": tokenizer_path, "description": description}
    if args.json:
        print_json(report)
    else:
        print(format_report(report), flush=True)
    total = report["total"]
    if total["samples"] == 0:
        if total["records"] == 0:
            raise UserInputError(f"{args.input}: no records to inspect")
        raise UserInputError(
            f"{args.input}: no usable sample: all {total['records']} records "
            f"were rejected (see the report above)"
        )
    return 0


def _tokenizer_for(path: Optional[str], scratch: str):
    """(tokenizer, description): the given directory, or the tiny demo tokenizer built in
    `scratch`."""
    from mindspeed_vita.data.tokenizer import load_tokenizer

    if path:
        return load_tokenizer(path), path
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = load_tokenizer(build_tiny_tokenizer(os.path.join(scratch, "tokenizer")))
    return tokenizer, (
        "tiny demo tokenizer (built in a temporary directory; token counts differ from "
        "Qwen2.5's: pass --tokenizer DIR)"
    )
