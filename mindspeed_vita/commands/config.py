"""`mindspeed-vita config CONFIG [key=value ...]`: validate and print the resolved config.

CONFIG is a stage YAML, or a model YAML (a file holding only the `model:` section, e.g.
configs/model/long_vita_14b.yaml). `--params` builds the model on the meta device (no memory, no
accelerator) and prints its parameter count per part instead of the config.
"""
from __future__ import annotations

import json
import os

import yaml

from mindspeed_vita.commands.argtypes import existing_file, positive_int


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita config`."""
    parser.add_argument("config", type=existing_file,
                        help="stage YAML, or a model YAML (the model section alone)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides, e.g. parallel.tp=2 (in a model YAML: "
                             "language.num_layers=2)")
    parser.add_argument("--world-size", type=positive_int, default=None,
                        help="also check the parallel layout against this many processes")
    parser.add_argument("--params", action="store_true",
                        help="build the model on the meta device and print its parameter count "
                             "per part (vision / projector / language / total)")
    parser.add_argument("--json", action="store_true", help="with --params: one JSON object")


def _is_model_file(path: str) -> bool:
    """True when the YAML at `path` holds only model keys (vision, language, ...)."""
    from mindspeed_vita.config.model import ModelConfig

    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError:
            return False  # load_config reports the YAML error with its line
    return isinstance(raw, dict) and bool(raw) and set(raw) <= set(ModelConfig.model_fields)


def load_model_config(path: str, overrides):
    """The `ModelConfig` of a model YAML plus dotted `overrides`; ConfigError names the key."""
    from pydantic import ValidationError

    from mindspeed_vita.config.loader import apply_overrides, format_validation_error
    from mindspeed_vita.config.model import ModelConfig
    from mindspeed_vita.config.schema import ConfigError

    with open(path, encoding="utf-8") as f:
        raw = apply_overrides(yaml.safe_load(f), overrides)
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, path, ModelConfig)) from None


def print_parameter_counts(model_cfg, *, as_json: bool) -> None:
    """Build `model_cfg` on the meta device in this one process and print its parameters per
    part (the whole model: a one-process layout holds every shard)."""
    from backends import get_backend
    from mindspeed_vita.models.build import PARTS, build_meta_model, parameter_counts
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    # NOTE: the meta build allocates nothing, so the CPU backend serves whatever the hardware
    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout())
    try:
        counts = parameter_counts(build_meta_model(model_cfg, backend, groups=groups))
    finally:
        destroy_parallel()
    if as_json:
        print(json.dumps(counts))
        return
    for part in PARTS + ("total",):
        print(f"{part:>10}: {counts[part]:>17,} ({counts[part] / 1e9:.3f} B)")


def run(args) -> int:
    from mindspeed_vita.config.loader import load_config

    if _is_model_file(args.config):
        if args.world_size is not None:
            from mindspeed_vita.errors import UserInputError

            raise UserInputError(f"--world-size needs a stage config; {args.config} holds only "
                                 f"a model section")
        model_cfg = load_model_config(args.config, args.overrides)
        if args.params:
            print_parameter_counts(model_cfg, as_json=args.json)
        else:
            print(yaml.safe_dump(model_cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.world_size is not None:
        layout = cfg.check_world_size(args.world_size)
        if not (args.params and args.json):  # keep --json output one JSON object
            print(f"# layout for world size {args.world_size}: tp={layout.tp} pp={layout.pp} "
                  f"cp={layout.cp} dp={layout.dp}")
    if args.params:
        print_parameter_counts(cfg.model, as_json=args.json)
    else:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0
