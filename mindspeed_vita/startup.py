"""Process start-up of the `mindspeed-vita` command: logging, third-party noise, import cost.

Called once by `cli.main` after the arguments are parsed (so `--help` and argument errors never
pay for it), before the command's own imports:

* `configure_logging(verbose)`: our messages at INFO (DEBUG with `--verbose`) on stderr;
* `route_third_party_warnings()`: warnings from libraries that say nothing to our user
  (megatron-core's "Transformer Engine and Apex are not installed", "full scope is deprecated",
  `CUDA_DEVICE_MAX_CONNECTIONS` advice, ...) go to the log at DEBUG level instead of stderr;
  every other warning is shown as usual;
* `defer_engine_compile()`: megatron-core decorates its fused kernels with `torch.compile` at
  import time, which imports TorchDynamo and Inductor (several seconds, more than the rest of
  megatron) even when no fused kernel ever runs. While megatron-core is being imported,
  `torch.compile` is replaced by a wrapper that calls the real `torch.compile` on the
  function's first call, so the cost is paid only by code that runs such a kernel, and the
  compiled function is the same. This holds for every `megatron.core` module, whenever it is
  imported.

Inference commands also call `defer_engine_package_init()` before their first megatron import:
`megatron/core/__init__.py` imports the whole engine (data-parallel wrapper, optimizer,
timers and with them TensorBoard, setuptools, ...), and Python runs it before any submodule.
With the deferral, `import megatron.core.x` imports `x` and what `x` needs; the package's own
names (`__version__`, `DistributedDataParallel`, `Timers`, ...) run its `__init__` on first
access, so every name is still there. The same call hides torch's DTensor modules from
`megatron.core.utils` while it is imported: it imports them inside `try/except ImportError`
only to recognise DTensors (FSDP, distributed checkpoints; `HAVE_DTENSOR` is its switch), and
they import SymPy and the DTensor op tables, a second or more of start-up; inference makes no
DTensor. Code that imports DTensor itself later still gets it. Training keeps the eager package
import (its side effects, e.g. the classes registered for `torch.load`, matter when checkpoints
are read) and megatron's DTensor support.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import re
import sys
import warnings
from typing import Any, Callable, Optional

#: logger of third-party messages routed away from stderr (shown with --verbose)
THIRD_PARTY_LOGGER = "mindspeed_vita.third_party"

#: messages (regular expressions, searched) of third-party warnings and log records that carry
#: no information for a mindspeed-vita user: optional NVIDIA libraries we do not use, megatron
#: deprecations of options we never set, and launch advice our launch scripts already follow.
KNOWN_NOISE = tuple(
    re.compile(p)
    for p in (
        r"Transformer Engine and Apex are not installed",
        r"Apex is not installed",
        r"Transformer Engine is not installed",
        r"full scope is deprecated",
        r"CUDA_DEVICE_MAX_CONNECTIONS",
        r"torch\.distributed\._shard",
        r"TypedStorage is deprecated",
        r"The cuda\.cudart module is deprecated",
        r"nvidia-modelopt",
        r"is not installed\. Falling back",
    )
)


def is_known_noise(message: str) -> bool:
    """True when `message` is a third-party warning that `route_third_party_warnings` hides."""
    return any(p.search(message) for p in KNOWN_NOISE)


def configure_logging(verbose: bool = False) -> None:
    """One stderr handler on the root logger: our INFO messages (DEBUG with `verbose`);
    known third-party noise only with `verbose`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mindspeed_vita", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._mindspeed_vita = True  # type: ignore[attr-defined]  # found again on a re-run
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
    handler.addFilter(_NoiseFilter(verbose))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("mindspeed_vita").setLevel(logging.DEBUG if verbose else logging.INFO)


class _NoiseFilter(logging.Filter):
    """Drops known third-party log records unless verbose; then shows them at DEBUG."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("mindspeed_vita") and record.name != THIRD_PARTY_LOGGER:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed third-party record: let logging report it as usual
            return True
        if not is_known_noise(message):
            return True
        if not self.verbose:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def route_third_party_warnings() -> None:
    """Send known third-party warnings to the DEBUG log; show every other warning as usual."""
    if getattr(warnings.showwarning, "_mindspeed_vita", False):
        return
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if is_known_noise(str(message)):
            logging.getLogger(THIRD_PARTY_LOGGER).debug(
                "%s: %s (%s:%s)", category.__name__, message, filename, lineno
            )
            return
        shown(message, category, filename, lineno, file, line)

    showwarning._mindspeed_vita = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def lazy_compile(real_compile: Callable) -> Callable:
    """A stand-in for `torch.compile` that compiles on the decorated function's first call."""

    def compile_later(model: Optional[Callable] = None, **options: Any):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: compile_later(fn, **options)
        compiled: list = []

        @functools.wraps(model)
        def call(*args, **kwargs):
            if not compiled:
                compiled.append(real_compile(model, **options))
            return compiled[0](*args, **kwargs)

        return call

    compile_later._mindspeed_vita_lazy = True  # type: ignore[attr-defined]
    return compile_later


#: the engine package whose imports `_EngineImportFinder` adjusts
ENGINE_PACKAGE = "megatron.core"
#: set by `defer_engine_package_init`: run megatron/core/__init__.py on first use of its names
_defer_package_init = False
#: torch modules `megatron.core.utils` imports optionally, only to recognise DTensors; hidden
#: from it (it then sets HAVE_DTENSOR = False) when the package init is deferred
DTENSOR_MODULES = ("torch.distributed._tensor", "torch.distributed.tensor")


class _HideModules(importlib.abc.MetaPathFinder):
    """Makes importing any of `names` (not yet imported) raise ImportError."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names:
            raise ModuleNotFoundError(f"{fullname} is not imported at inference start-up",
                                      name=fullname)
        return None


def _run_without_dtensor(exec_module: Callable, module) -> None:
    """`exec_module(module)` (lazy compile) while torch's DTensor modules cannot be imported."""
    hide = _HideModules(DTENSOR_MODULES)
    sys.meta_path.insert(0, hide)
    try:
        _run_with_lazy_compile(exec_module, module)
    finally:
        sys.meta_path.remove(hide)


def _run_with_lazy_compile(exec_module: Callable, module) -> None:
    """`exec_module(module)` with `torch.compile` replaced by `lazy_compile` (once: nested
    megatron imports see the stand-in already in place and leave it)."""
    import torch

    real = torch.compile
    if getattr(real, "_mindspeed_vita_lazy", False):
        exec_module(module)
        return
    torch.compile = lazy_compile(real)
    try:
        exec_module(module)
    finally:
        torch.compile = real


def _defer_init(module, exec_module: Callable) -> None:
    """Leave `module` (the engine package) with no body yet: a submodule asked for by name
    is imported alone; any other name runs the package's `__init__` first."""

    def __getattr__(name: str):
        submodule = f"{module.__name__}.{name}"
        if not name.startswith("__") and importlib.util.find_spec(submodule) is not None:
            return importlib.import_module(submodule)
        del module.__getattr__
        _run_with_lazy_compile(exec_module, module)
        return getattr(module, name)

    module.__getattr__ = __getattr__


class _EngineImportFinder(importlib.abc.MetaPathFinder):
    """Finds `megatron.core` and its submodules with the normal machinery and runs their
    import with a lazy `torch.compile`, deferring the package's `__init__` when asked (see the
    module docstring)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != ENGINE_PACKAGE and not fullname.startswith(ENGINE_PACKAGE + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module
        defer = fullname == ENGINE_PACKAGE and _defer_package_init
        no_dtensor = fullname == ENGINE_PACKAGE + ".utils" and _defer_package_init

        def exec_adjusted(module):
            if defer:
                _defer_init(module, exec_module)
            elif no_dtensor:
                _run_without_dtensor(exec_module, module)
            else:
                _run_with_lazy_compile(exec_module, module)

        spec.loader.exec_module = exec_adjusted  # type: ignore[method-assign]
        return spec


def defer_engine_compile() -> None:
    """Install the lazy-`torch.compile` import of megatron-core (its modules imported from now
    on compile their kernels on first call)."""
    if not any(isinstance(f, _EngineImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _EngineImportFinder())


def defer_engine_package_init() -> None:
    """Import megatron-core's modules one by one, as used, instead of the whole package at the
    first import, and without torch's DTensor support (see the module docstring): for
    inference processes. No effect once `megatron.core` is imported."""
    global _defer_package_init
    _defer_package_init = True
    defer_engine_compile()


def prepare(verbose: bool = False) -> None:
    """Everything above, in the order a command needs it."""
    configure_logging(verbose)
    route_third_party_warnings()
    defer_engine_compile()
