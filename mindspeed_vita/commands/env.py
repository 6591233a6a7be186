"""`mindspeed-vita env`: which backend this machine selects, and the library versions."""
from __future__ import annotations

import json
import platform


def add_arguments(parser) -> None:
    parser.add_argument("--backend", default=None,
                        help="auto | npu | cuda | cpu (default: $MINDSPEED_VITA_BACKEND or auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import torch

    from backends import get_backend

    backend = get_backend(args.backend)
    info = dict(backend.describe(), python=platform.python_version(), torch=torch.__version__)
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
        info["transformers"] = version("transformers")
    except Exception:  # metadata missing in odd installs: versions are informative only
        pass
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>14}: {v}")
    return 0
