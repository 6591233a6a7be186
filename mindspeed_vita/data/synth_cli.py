"""`mindspeed-vita data synth OUT`: write the synthetic demo dataset (and optionally the tiny
tokenizer) to OUT.

OUT receives the images, videos, one JSONL per source (plus its held-out split) and the four
stage mixtures stage1.yaml .. stage4.yaml (see `mindspeed_vita.data.synth`). The demo stage
configs in configs/demo/ expect it at <repo>/demo_out/data. With `--write-tokenizer`, the tiny
demo tokenizer is written to OUT/tokenizer too. Same seed and counts, same bytes.
"""
from __future__ import annotations

import os
import time

from mindspeed_vita.commands.argtypes import non_negative_int, output_dir
from mindspeed_vita.errors import UserInputError


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita data synth`."""
    parser.add_argument("out", metavar="OUT", type=output_dir,
                        help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--n-single", type=non_negative_int, default=64,
                        help="single images; each gives a caption and a QA record")
    parser.add_argument("--n-comic", type=non_negative_int, default=16,
                        help="comic strips of 3-6 panels")
    parser.add_argument("--n-video", type=non_negative_int, default=8,
                        help="video clips; each gives a QA and a caption record, and training "
                             "clips are grouped by three into movies")
    parser.add_argument("--n-text", type=non_negative_int, default=32,
                        help="text-only records, half short, half long")
    parser.add_argument("--heldout-fraction", type=float, default=0.1,
                        help="fraction of items kept for evaluation only, in [0, 1)")
    parser.add_argument("--write-tokenizer", action="store_true",
                        help="also build the tiny demo tokenizer into OUT/tokenizer (the directory "
                             "that --tokenizer of other commands takes)")


def run(args) -> int:
    """Entry point of `mindspeed-vita data synth`."""
    from mindspeed_vita.data.synth import write_synthetic_dataset

    for flag in ("n_single", "n_comic", "n_video", "n_text"):
        if getattr(args, flag) < 0:
            raise UserInputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    if not 0.0 <= args.heldout_fraction < 1.0:
        raise UserInputError(f"--heldout-fraction {args.heldout_fraction}: must be in [0, 1)")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserInputError(f"{out}: exists and is not a directory")
    start = time.perf_counter()
    print(f"[synth] writing {args.n_single} images, {args.n_comic} comics, {args.n_video} clips and "
          f"{args.n_text} texts (seed {args.seed}) to {out}", flush=True)
    paths = write_synthetic_dataset(out, seed=args.seed, n_single=args.n_single, n_comic=args.n_comic,
                                    n_video=args.n_video, n_text=args.n_text,
                                    heldout_fraction=args.heldout_fraction)
    print(f"[synth] done in {time.perf_counter() - start:.1f} s", flush=True)
    for name, path in paths.items():
        if name == "root":
            continue
        if path.endswith(".jsonl"):
            count = _count_lines(path)
            detail = f"{count} record{'' if count == 1 else 's'}"
        else:
            detail = "mixture"
        print(f"  {name:<22} {path}  ({detail})")
    if args.write_tokenizer:
        from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

        print(f"[synth] tokenizer -> {build_tiny_tokenizer(os.path.join(out, 'tokenizer'))}", flush=True)
    return 0


def _count_lines(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())
