"""`mindspeed-vita infer`: generate from a native checkpoint or an HF InternVL directory."""
from __future__ import annotations

import json
import sys

from mindspeed_vita.commands.argtypes import (
    add_backend_argument, existing_dir, existing_file, existing_path, positive_float,
    positive_int)


#: flags that override `inference.<key>` of --config (flag --max-new-tokens <-> max_new_tokens)
INFERENCE_FLAGS = ("max_new_tokens", "temperature", "top_p", "seed", "max_num_frame",
                   "system_prompt", "greedy")


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita infer`; a flag that sets a config value has its key's name."""
    from mindspeed_vita.inference.launch import add_parallel_arguments

    parser.add_argument("--checkpoint", required=True, type=existing_dir,
                        help="native checkpoint directory or HF InternVL directory")
    parser.add_argument("--prompt", required=True,
                        help="user text; may contain <image>/<video> tags")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", type=existing_file,
                        help="image file (repeat for several, in tag order)")
    parser.add_argument("--video", action="append", default=[], metavar="PATH", type=existing_path,
                        help="video file or frame directory (repeat for several)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="most tokens to generate (inference.max_new_tokens, default 64)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_const", const=True, default=None,
                      help="argmax decoding (inference.greedy; the default)")
    mode.add_argument("--temperature", type=positive_float, default=None,
                      help="sample at this temperature instead of greedy (inference.temperature)")
    parser.add_argument("--top-p", type=positive_float, default=None,
                        help="nucleus mass when sampling, in (0, 1] (inference.top_p)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (inference.seed)")
    parser.add_argument("--max-num-frame", type=positive_int, default=None,
                        help="frames sampled per video (inference.max_num_frame, default 64)")
    parser.add_argument("--system-prompt", default=None,
                        help="system message (inference.system_prompt; default none, as in "
                             "training)")
    add_parallel_arguments(parser)
    add_backend_argument(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with text, token_ids and logprobs")


def check_request(args) -> None:
    """Fail before the model loads (minutes at full size) on what the request alone shows: tag
    counts that disagree with --image/--video, and image files that are missing or have no
    readable image header. (A file truncated past its header fails when it is decoded.)"""
    import os

    from mindspeed_vita.data.errors import DataError
    from mindspeed_vita.data.images import read_image_size
    from mindspeed_vita.errors import UserInputError
    from mindspeed_vita.inference.engine import build_request

    build_request(args.prompt, args.image, args.video)
    for path in args.image:
        try:
            read_image_size(path)
        except DataError as error:
            raise UserInputError(f"--image {error}") from None
    for path in args.video:
        if not os.path.exists(path):
            raise UserInputError(f"--video {path}: no such file or directory")


def run(args) -> int:
    """Load the checkpoint on every rank (torchrun: CP x TP x DP processes) and generate; rank 0
    prints. Progress of the (slow) loading on stderr."""
    from mindspeed_vita import startup
    from mindspeed_vita.errors import UserInputError
    from mindspeed_vita.progress import steps

    # the model and its groups need a few megatron-core modules, not the whole package
    startup.defer_engine_package_init()
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserInputError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.temperature is not None:
        args.greedy = False
    with steps(["import torch and megatron-core", "check the request", "load the checkpoint"],
               desc="[infer]") as step:
        step("import torch and megatron-core")
        import torch.distributed as dist

        from mindspeed_vita.inference.engine import Generator
        from mindspeed_vita.inference.launch import load_model, stage_config
        from mindspeed_vita.inference.sampling import SamplingParams
        from mindspeed_vita.parallel.process_groups import destroy_parallel

        step("check the request")
        check_request(args)
        cfg = stage_config(args, INFERENCE_FLAGS)
        inf = cfg.inference
        sampling = SamplingParams(greedy=inf.greedy, temperature=inf.temperature, top_p=inf.top_p)
        step("load the checkpoint")
        model, tokenizer, _ = load_model(cfg, args.checkpoint, args.backend)
    try:
        gen = Generator(model, tokenizer, max_num_frame=inf.max_num_frame,
                        system_prompt=inf.system_prompt, decode_mode=inf.decode_mode)
        result = gen.generate(args.prompt, args.image, args.video,
                              max_new_tokens=inf.max_new_tokens, sampling=sampling,
                              seed=inf.seed)
        rank = dist.get_rank()
    finally:
        destroy_parallel()
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "logprobs": result.logprobs, "prompt_tokens": result.prompt_tokens,
                          "stop_reason": result.stop_reason}))
    else:
        sys.stdout.write(result.text + "\n")
    return 0
