"""`mindspeed-vita config STAGE.yaml [key=value ...]`: validate and print the resolved config."""
from __future__ import annotations

import yaml


def add_arguments(parser) -> None:
    parser.add_argument("config", help="stage YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tp=2")
    parser.add_argument("--world-size", type=int, default=None,
                        help="also check the parallel layout against this many processes")


def run(args) -> int:
    from mindspeed_vita.config.loader import load_config

    cfg = load_config(args.config, args.overrides)
    if args.world_size is not None:
        layout = cfg.check_world_size(args.world_size)
        print(f"# layout for world size {args.world_size}: tp={layout.tp} pp={layout.pp} "
              f"cp={layout.cp} dp={layout.dp}")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0
