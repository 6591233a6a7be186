"""What `infer` and `serve` share: the stage config with the command's flags on top, the
parallel layout of the launch (CP / TP under torchrun), and the model loaded on every rank.

A flag named after an `inference.*` key overrides that key of `--config` (a stage YAML, or none:
the defaults); `--cp` / `--tp` override `parallel.cp` / `parallel.tp`. The rest of the world is
data parallel (every data-parallel group generates the same request).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable


def add_parallel_arguments(parser, *, config: bool = True) -> None:
    """--config (unless the command has its own), --cp, --tp, --decode-mode, --lm-head."""
    from mindspeed_vita.commands.argtypes import existing_file, positive_int

    if config:
        parser.add_argument("--config", default=None, type=existing_file,
                            help="stage or inference YAML: its inference.* and parallel.* keys "
                                 "are the defaults the flags override")
    parser.add_argument("--cp", type=positive_int, default=None,
                        help="context-parallel size (parallel.cp); launch that many processes "
                             "with torchrun (shell/infer.sh)")
    parser.add_argument("--tp", type=positive_int, default=None,
                        help="tensor-parallel size (parallel.tp)")
    parser.add_argument("--decode-mode", choices=("kv-cache", "fixed-length"), default=None,
                        help="inference.decode_mode: kv-cache (default) or the paper's "
                             "fixed-length re-run per token")
    parser.add_argument("--lm-head", choices=("full", "chunked", "logits-masked"), default=None,
                        help="inference.lm_head (default logits-masked: only the predicting row "
                             "is projected)")


def stage_config(args, inference_flags: Iterable[str]):
    """The config of `--config` with every given flag of `inference_flags` (attribute names =
    `inference.*` keys), `--decode-mode`, `--lm-head`, `--cp` and `--tp` applied; ConfigError
    naming the key on a bad value."""
    from pydantic import ValidationError

    from mindspeed_vita.config.loader import format_validation_error, load_config
    from mindspeed_vita.config.schema import InferenceConfig, ParallelConfig
    from mindspeed_vita.errors import ConfigError

    cfg = load_config(args.config)
    keys = list(inference_flags) + ["decode_mode", "lm_head"]
    update: Dict[str, Any] = {k: getattr(args, k) for k in keys
                              if getattr(args, k, None) is not None}
    par = {k: getattr(args, k) for k in ("cp", "tp") if getattr(args, k, None) is not None}
    try:
        inference = InferenceConfig.model_validate({**cfg.inference.model_dump(), **update})
        parallel = ParallelConfig.model_validate({**cfg.parallel.model_dump(), **par})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, args.config or "<flags>")) from None
    return cfg.model_copy(update={"inference": inference, "parallel": parallel})


def load_model(cfg, checkpoint: str, backend_name):
    """(model, tokenizer, groups): the parallel groups of this launch and the checkpoint loaded
    on this rank with the inference head. The caller calls `destroy_parallel()` at the end."""
    from backends import get_backend
    from mindspeed_vita.errors import UserInputError
    from mindspeed_vita.models.build import load_pretrained
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import (destroy_parallel, initialize_parallel,
                                                        launch_world_size)

    if cfg.parallel.sequence_parallel:
        raise UserInputError("parallel.sequence_parallel: inference runs without it (one new "
                             "token cannot be split over the tp ranks); set it false")
    layout = ParallelLayout.from_config(cfg.parallel, launch_world_size())
    backend = get_backend(backend_name or (None if cfg.backend == "auto" else cfg.backend))
    groups = initialize_parallel(backend, layout)
    try:
        model, tokenizer, _ = load_pretrained(checkpoint, backend, groups=groups,
                                              config_update={"lm_head": cfg.inference.lm_head})
    except BaseException:
        destroy_parallel()
        raise
    model.eval()
    return model, tokenizer, groups
