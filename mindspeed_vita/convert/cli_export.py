"""`mindspeed-vita convert export-hf SRC DST`: a native or training checkpoint -> an HF directory.

`--layout internvl` (default) writes transformers' InternVL layout; `--layout long-vita` writes
the Long-VITA release's `_HF` layout (`convert.long_vita`), which the release's own tools load.

Gathers the language shards (any tp) into full tensors, renames everything to transformers'
InternVL names and writes config.json, the weights (sharded above 5 GB) and the tokenizer. A
"long-vita" projector has no HF equivalent: it is written under `long_vita_projector.*` and
config.json says so (see `convert.hf_internvl`), which this command prints.
"""
from __future__ import annotations

import os

from mindspeed_vita.commands.argtypes import existing_dir


def add_arguments(parser) -> None:
    """Arguments of `convert export-hf`."""
    parser.add_argument("src", metavar="SRC", type=existing_dir,
                        help="native checkpoint, training checkpoint or training run directory "
                             "(its latest checkpoint)")
    parser.add_argument("dst", metavar="DST", help="HF directory to create")
    parser.add_argument("--layout", choices=("internvl", "long-vita"), default="internvl",
                        help="internvl: transformers' InternVLForConditionalGeneration layout; "
                             "long-vita: the Long-VITA release's _HF layout "
                             "(LongVITAForCausalLM)")


def _progress(step: int, total: int, message: str) -> None:
    print(f"[{step}/{total}] {message}", flush=True)


def run(args) -> int:
    """Convert; prints one progress line per stage, the first before the slow imports."""
    from mindspeed_vita.errors import UserInputError

    if os.path.exists(args.dst) and (not os.path.isdir(args.dst) or os.listdir(args.dst)):
        raise UserInputError(f"destination {args.dst!r} already exists and is not an empty "
                             f"directory; choose a new path")
    total = 3
    _progress(1, total, f"reading native checkpoint {args.src} (importing torch and "
                        f"transformers first)")
    from mindspeed_vita.convert.checkpoint import NativeModel, TOKENIZER_DIR, read_full_state
    from mindspeed_vita.convert.hf_internvl import export_internvl
    from mindspeed_vita.convert.long_vita import export_long_vita
    from mindspeed_vita.data.tokenizer import load_tokenizer

    from mindspeed_vita.training.export import is_training_source, training_checkpoint_as_native

    if is_training_source(args.src):  # a training checkpoint or run directory (any tp / dp)
        native = training_checkpoint_as_native(args.src)
        _progress(2, total, f"read {len(native.state)} tensors from training checkpoint")
    else:
        meta, state = read_full_state(args.src)
        tokenizer = load_tokenizer(os.path.join(args.src, TOKENIZER_DIR))
        native = NativeModel(cfg=meta.model_config, state=state, tokenizer=tokenizer,
                             hf_source_config=meta.hf_source_config,
                             hf_generation_config=meta.hf_generation_config)
        _progress(2, total, f"gathered {len(state)} tensors from tp={meta.tp_size} shards")
    layout = getattr(args, "layout", "internvl")
    if layout == "internvl" and native.cfg.projector.variant == "long-vita":
        print("note: the long-vita projector has no transformers equivalent; it is written as "
              "long_vita_projector.* (config.json: mindspeed_vita.projector_variant) and only "
              "mindspeed-vita can run it", flush=True)
    where = f"checkpoint {args.src!r} (config in its mindspeed_vita.json)"
    export = export_long_vita if layout == "long-vita" else export_internvl
    files = export(native, args.dst, where=where)
    _progress(3, total, f"done: {args.dst} (config.json, generation_config.json, "
                        f"{', '.join(files)}, tokenizer files)")
    return 0
