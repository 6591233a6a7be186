"""`mindspeed-vita env`: our version, the backend this machine selects, and library versions.

Optional accelerator packages (torch_npu, flash-attn) are reported from their installed
metadata, without importing them: importing torch_npu on a host without CANN fails, and
`env` is the command that must work everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import platform
from typing import Optional

from mindspeed_vita.commands.argtypes import add_backend_argument

#: (name shown, distribution name, import name) of the libraries `env` reports
LIBRARIES = (
    ("torch", "torch", "torch"),
    ("megatron_core", "megatron-core", "megatron.core"),
    ("transformers", "transformers", "transformers"),
    ("torch_npu", "torch_npu", "torch_npu"),
    ("flash_attn", "flash-attn", "flash_attn"),
    ("mindspeed", "mindspeed", "mindspeed"),
)


def add_arguments(parser) -> None:
    """Flags of `mindspeed-vita env`."""
    add_backend_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def installed_version(distribution: str, module: str) -> Optional[str]:
    """The installed version of `distribution`, "installed" when importable without metadata
    (e.g. a source checkout on PYTHONPATH), None when absent. Never imports the module."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        pass
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or broken
        found = False
    return "installed (no version metadata)" if found else None


def run(args) -> int:
    """Print the report; the backend line fails (one error line) when it cannot run here."""
    from mindspeed_vita import __version__

    from backends import get_backend  # imports torch

    info = {"mindspeed_vita": __version__}
    info.update(get_backend(args.backend).describe())
    info["python"] = platform.python_version()
    for name, distribution, module in LIBRARIES:
        info[name] = installed_version(distribution, module) or "not installed"
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>14}: {value}")
    return 0
