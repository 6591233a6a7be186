"""The backend a stage config selects, with its `backend_options`."""
from __future__ import annotations

from typing import Optional

from backends import Backend, get_backend
from mindspeed_vita.config.schema import StageConfig


def backend_for_stage(stage: StageConfig, name: Optional[str] = None) -> Backend:
    """The backend for `stage`: `name` (e.g. a `--backend` flag) when given, else the config key
    `backend` (where `auto` lets MINDSPEED_VITA_BACKEND decide). Every backend receives the
    `backend_options` it takes; the others' options are ignored, so one stage config runs
    unchanged on NPU, GPU and CPU."""
    chosen = name or (None if stage.backend == "auto" else stage.backend)
    return get_backend(chosen, **stage.backend_options.model_dump())
