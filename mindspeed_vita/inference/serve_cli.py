"""`mindspeed-vita serve`: the OpenAI-compatible HTTP server for a checkpoint.

    mindspeed-vita serve --checkpoint DIR [--host H] [--port P] [--config STAGE.yaml]
                         [--allow-local-media DIR] [--max-prompt-tokens N] [--cp N] ...

With --cp N (and/or --tp) start it under torchrun with that many processes (shell/infer.sh
serve ...): rank 0 serves HTTP and drives the other ranks (inference/multi_rank.py).

Limits and sampling defaults are the `inference.*` keys of the config (a stage YAML, or none:
the defaults); each has a flag of the same name that overrides it. The model loads once, then
requests are served one at a time (see inference/service.py).
"""
from __future__ import annotations

import os

#: flags that override `inference.<key>` (flag --max-prompt-tokens <-> key max_prompt_tokens)
_LIMIT_FLAGS = (("max_prompt_tokens", int), ("max_images", int), ("max_videos", int),
                ("max_num_frame", int), ("max_new_tokens", int), ("max_request_bytes", int),
                ("request_timeout", float))


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="native checkpoint directory or HF InternVL directory")
    parser.add_argument("--config", default=None,
                        help="stage YAML whose inference.* keys set limits and sampling defaults")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--model-name", default=None,
                        help="model id clients send and /v1/models lists (default: the "
                             "checkpoint directory's name)")
    parser.add_argument("--allow-local-media", default=None, metavar="DIR",
                        help="let requests name image/video files under DIR by path (default: "
                             "inline data: URIs only)")
    for key, kind in _LIMIT_FLAGS:
        parser.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                            help=f"override inference.{key}")
    parser.add_argument("--backend", default=None, help="auto | npu | cuda | cpu")
    from mindspeed_vita.inference.launch import add_parallel_arguments

    add_parallel_arguments(parser, config=False)


def _stage_config(args):
    from mindspeed_vita.errors import UserInputError
    from mindspeed_vita.inference.launch import stage_config

    if args.allow_local_media is not None:
        if not os.path.isdir(args.allow_local_media):
            raise UserInputError(f"--allow-local-media {args.allow_local_media}: not a directory")
        args.allow_local_media = os.path.abspath(args.allow_local_media)
    return stage_config(args, [key for key, _ in _LIMIT_FLAGS] + ["allow_local_media"])


def run(args) -> int:
    """Load the model on every rank; rank 0 serves HTTP and drives the others (under torchrun
    with --cp / --tp), which follow until it stops."""
    from mindspeed_vita.errors import UserInputError

    if not 0 <= args.port <= 65535:
        raise UserInputError(f"--port must be in 0..65535, got {args.port}")
    if not os.path.isdir(args.checkpoint):
        raise UserInputError(f"--checkpoint {args.checkpoint}: not a directory")
    cfg = _stage_config(args)
    inference = cfg.inference

    from mindspeed_vita import startup

    startup.defer_engine_package_init()  # a few megatron-core modules, not the whole package
    import torch.distributed as dist
    import uvicorn

    from mindspeed_vita.inference.engine import Generator
    from mindspeed_vita.inference.launch import load_model
    from mindspeed_vita.inference.multi_rank import RankDriver, follow
    from mindspeed_vita.inference.server import create_app
    from mindspeed_vita.inference.service import GenerationService
    from mindspeed_vita.parallel.process_groups import destroy_parallel

    model, tokenizer, _ = load_model(cfg, args.checkpoint, args.backend)
    service = driver = None
    try:
        generator = Generator(model, tokenizer, max_num_frame=inference.max_num_frame,
                              system_prompt=inference.system_prompt,
                              decode_mode=inference.decode_mode)
        if dist.get_world_size() > 1:
            if model.groups.dp_size > 1:
                raise UserInputError(
                    f"serve: {dist.get_world_size()} processes for parallel.cp x parallel.tp = "
                    f"{model.groups.cp_size * model.groups.tp_size}: launch exactly cp x tp "
                    f"processes (one model; data-parallel replicas are not served)")
            if dist.get_rank() != 0:
                follow(generator)
                return 0
            driver = RankDriver(generator)
        service = GenerationService(generator, inference,
                                    generate=None if driver is None else driver.generate)
        name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
        print(f"mindspeed-vita: serving {name!r} on http://{args.host}:{args.port}/v1 "
              f"({dist.get_world_size()} process(es))", flush=True)
        uvicorn.run(create_app(service, model_name=name), host=args.host, port=args.port,
                    log_level="warning")
    finally:
        if service is not None:
            service.close()
        if driver is not None:
            driver.close()
        destroy_parallel()
    return 0
