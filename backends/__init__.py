"""Backend registry and selection.

`get_backend(name)` returns the backend for `name` (`auto | npu | cuda | cpu`); when `name` is
None the environment variable `MINDSPEED_VITA_BACKEND` decides, else "auto". `auto` picks NPU
when torch_npu imports and a device is present, else CUDA when a GPU is visible, else CPU.
Selecting a backend never imports an accelerator package as a side effect of importing this
module; the NPU module imports torch_npu lazily, on first use.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Type

from backends.base import Backend, BackendUnavailableError

ENV_VAR = "MINDSPEED_VITA_BACKEND"
CHOICES = ("auto", "npu", "cuda", "cpu")


def _backend_class(name: str) -> Type[Backend]:
    if name == "cpu":
        from backends.cpu import CPUBackend

        return CPUBackend
    if name == "cuda":
        from backends.cuda import CUDABackend

        return CUDABackend
    if name == "npu":
        from backends.npu import NPUBackend

        return NPUBackend
    raise BackendUnavailableError(
        f"unknown backend {name!r}: choose one of {', '.join(CHOICES)} (config key 'backend' "
        f"or environment variable {ENV_VAR})")


_cache: Dict[str, Backend] = {}


def resolve_backend_name(name: Optional[str] = None) -> str:
    """The concrete backend name ("npu" | "cuda" | "cpu") that `name` selects here."""
    name = (name or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name not in CHOICES:
        _backend_class(name)  # raises the uniform message
    if name != "auto":
        return name
    for candidate in ("npu", "cuda"):
        if _backend_class(candidate).probe() is None:
            return candidate
    return "cpu"


def backend_options_for(cls: Type[Backend], options: Dict[str, object]) -> Dict[str, object]:
    """The subset of `options` (config section `backend_options`) that backend `cls` takes.

    Options of other backends are dropped, so one config runs on every backend; a name that
    no backend knows is an error naming it.
    """
    known = set()
    for name in CHOICES[1:]:
        known.update(_backend_class(name).option_names)
    unknown = sorted(set(options) - known)
    if unknown:
        raise BackendUnavailableError(
            f"unknown backend option(s) {', '.join(map(repr, unknown))} (config section "
            f"'backend_options'); known: {', '.join(sorted(known))}")
    return {k: v for k, v in options.items() if k in cls.option_names}


def get_backend(name: Optional[str] = None, **options) -> Backend:
    """Return the (cached) backend `name` selects, raising BackendUnavailableError with one
    clear sentence when it cannot run on this machine. `options` are the config's
    `backend_options`; each backend receives the ones it takes (`Backend.option_names`)."""
    resolved = resolve_backend_name(name)
    cls = _backend_class(resolved)
    options = backend_options_for(cls, options)
    key = resolved + repr(sorted(options.items()))
    if key not in _cache:
        why = cls.probe()
        if why is not None:
            raise BackendUnavailableError(why)
        _cache[key] = cls(**options)
    return _cache[key]


__all__ = ["Backend", "BackendUnavailableError", "backend_options_for", "get_backend",
           "resolve_backend_name", "ENV_VAR", "CHOICES"]
