"""`mindspeed-vita serve`: the OpenAI-compatible HTTP server for a checkpoint.

    mindspeed-vita serve --checkpoint DIR [--host H] [--port P] [--config STAGE.yaml]
                         [--allow-local-media DIR] [--max-prompt-tokens N] ...

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


def _inference_config(args):
    from mindspeed_vita.config.loader import load_config
    from mindspeed_vita.errors import UserInputError

    overrides = [f"inference.{key}={getattr(args, key)}" for key, _ in _LIMIT_FLAGS
                 if getattr(args, key) is not None]
    if args.allow_local_media is not None:
        if not os.path.isdir(args.allow_local_media):
            raise UserInputError(f"--allow-local-media {args.allow_local_media}: not a directory")
        overrides.append(f"inference.allow_local_media={os.path.abspath(args.allow_local_media)}")
    return load_config(args.config, overrides).inference


def run(args) -> int:
    from mindspeed_vita.errors import UserInputError

    if not 0 <= args.port <= 65535:
        raise UserInputError(f"--port must be in 0..65535, got {args.port}")
    if not os.path.isdir(args.checkpoint):
        raise UserInputError(f"--checkpoint {args.checkpoint}: not a directory")
    inference = _inference_config(args)

    import uvicorn

    from backends import get_backend
    from mindspeed_vita.inference.engine import Generator
    from mindspeed_vita.inference.server import create_app
    from mindspeed_vita.inference.service import GenerationService
    from mindspeed_vita.models.build import load_pretrained
    from mindspeed_vita.config.schema import ParallelConfig
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import (destroy_parallel, initialize_parallel,
                                                        launch_world_size)

    # the default parallel section (no model split; extra torchrun processes are data parallel)
    layout = ParallelLayout.from_config(ParallelConfig(), launch_world_size())
    backend = get_backend(args.backend)
    groups = initialize_parallel(backend, layout)
    service = None
    try:
        model, tokenizer, _ = load_pretrained(args.checkpoint, backend, groups=groups)
        model.eval()
        generator = Generator(model, tokenizer, max_num_frame=inference.max_num_frame,
                              system_prompt=inference.system_prompt)
        service = GenerationService(generator, inference)
        name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
        print(f"mindspeed-vita: serving {name!r} on http://{args.host}:{args.port}/v1",
              flush=True)
        uvicorn.run(create_app(service, model_name=name), host=args.host, port=args.port,
                    log_level="warning")
    finally:
        if service is not None:
            service.close()
        destroy_parallel()
    return 0
