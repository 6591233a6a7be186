"""`mindspeed-vita convert import-hf SRC DST`: an HF checkpoint -> a native checkpoint.

SRC is an HF InternVL directory, a Long-VITA release `_HF` directory (model_type long_vita,
detected from its config.json), or a Qwen2 causal-LM directory together with
`--vision INTERNVIT_DIR` (the stage-1 starting point: the projector is created fresh, seeded,
of the `--projector` variant). Runs in one process on the CPU, on state dicts (no model, no
process group); the checkpoint is written sharded for `--tp` ranks and loads at any tp.
"""
from __future__ import annotations

import os
import sys

from mindspeed_vita.commands.argtypes import existing_dir, positive_int


def add_arguments(parser) -> None:
    """Arguments of `convert import-hf`."""
    parser.add_argument("src", metavar="SRC", type=existing_dir,
                        help="HF InternVL or Long-VITA _HF directory, or a Qwen2 causal-LM "
                             "directory with --vision")
    parser.add_argument("dst", metavar="DST", help="native checkpoint directory to create")
    parser.add_argument("--vision", metavar="DIR", default=None, type=existing_dir,
                        help="InternViT directory (original naming) to pair with a Qwen2 SRC")
    parser.add_argument("--projector", choices=("long-vita", "internvl"), default=None,
                        help="projector variant created for a Qwen2 + InternViT import "
                             "(default long-vita)")
    parser.add_argument("--tp", type=positive_int, default=1,
                        help="tensor-parallel size to shard the written checkpoint for "
                             "(parallel.tp)")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the fresh projector of a Qwen2 + InternViT import")


def _progress(step: int, total: int, message: str) -> None:
    print(f"[{step}/{total}] {message}", flush=True)


def _check_destination(dst: str) -> None:
    from mindspeed_vita.errors import UserInputError

    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise UserInputError(f"destination {dst!r} already exists and is not an empty "
                             f"directory; choose a new path")


def run(args) -> int:
    """Convert; prints one progress line per stage, the first before the slow imports."""
    _check_destination(args.dst)
    total = 4
    pair = f" and InternViT {args.vision}" if args.vision is not None else ""
    _progress(1, total, f"reading {args.src}{pair} (importing torch and transformers first)")
    from mindspeed_vita.convert.checkpoint import check_tp_size, write_checkpoint
    from mindspeed_vita.convert.hf_internvl import import_internvl
    from mindspeed_vita.convert.hf_split import import_split
    from mindspeed_vita.convert.long_vita import import_long_vita
    from mindspeed_vita.errors import UserInputError
    from mindspeed_vita.models.build import (HF_INTERNVL, HF_LONG_VITA, HF_QWEN2, INTERNVIT,
                                             checkpoint_kind)

    kind = checkpoint_kind(args.src)
    if args.vision is not None:
        if kind != HF_QWEN2:
            raise UserInputError(f"--vision pairs a vision encoder with a Qwen2 causal-LM SRC, "
                                 f"but {args.src!r} is a {kind} directory")
        vision_kind = checkpoint_kind(args.vision)
        if vision_kind != INTERNVIT:
            raise UserInputError(f"--vision {args.vision!r} is a {vision_kind} directory, not "
                                 f"an InternViT directory")
        variant = args.projector or "long-vita"
        native = import_split(args.src, args.vision, projector_variant=variant, seed=args.seed)
        detail = f"Qwen2 + InternViT with a new {variant} projector (seed {args.seed}): "
    elif kind in (HF_INTERNVL, HF_LONG_VITA):
        detail = ("HF InternVL" if kind == HF_INTERNVL else "Long-VITA release") + ": "
        native = import_internvl(args.src) if kind == HF_INTERNVL else import_long_vita(args.src)
        if args.projector is not None and args.projector != native.cfg.projector.variant:
            raise UserInputError(
                f"--projector {args.projector}: {args.src!r} holds a "
                f"{native.cfg.projector.variant} projector (the flag only chooses the variant "
                f"of a fresh projector for a Qwen2 + InternViT import)")
    elif kind == HF_QWEN2:
        raise UserInputError(f"{args.src!r} is a Qwen2 causal-LM directory: give its vision "
                             f"encoder with --vision INTERNVIT_DIR")
    else:
        raise UserInputError(f"{args.src!r} is a {kind} directory; import-hf reads an HF "
                             f"InternVL or Long-VITA directory, or a Qwen2 directory with --vision")
    cfg = native.cfg
    check_tp_size(cfg.language, args.tp)
    n_params = sum(t.numel() for t in native.state.values())
    _progress(2, total, f"{detail}converted {len(native.state)} tensors ({n_params:,} parameters, "
                        f"{cfg.params_dtype}); vocabulary {cfg.language.vocab_size}, tokenizer "
                        f"{len(native.tokenizer)} ids")
    _progress(3, total, f"writing {args.dst} sharded for tp={args.tp}")
    meta = write_checkpoint(native, args.dst, tp_size=args.tp)
    _progress(4, total, f"done: {args.dst} ({', '.join(meta.weight_files)}, tokenizer/, "
                        f"mindspeed_vita.json)")
    sys.stdout.flush()
    return 0
