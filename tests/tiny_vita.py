"""The tiny Long-VITA model of configs/model/tiny.yaml on the CPU backend, as the inference
tests build it (random weights fixed by the parallel seed)."""
from __future__ import annotations

import os

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL_YAML = os.path.join(REPO, "configs", "model", "tiny.yaml")


def tiny_model_config():
    """configs/model/tiny.yaml as a validated `ModelConfig`."""
    from mindspeed_vita.config.model import ModelConfig

    with open(TINY_MODEL_YAML) as f:
        return ModelConfig.model_validate(yaml.safe_load(f))


def tiny_vita(tok, *, seed: int, layout=None):
    """Start the process groups of `layout` (default: one process) with `seed` on the CPU
    backend and build the tiny `LongVitaModel` for tokenizer `tok` in them, in eval mode.
    The caller ends the groups (`destroy_parallel`) when it is done."""
    from backends import get_backend
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    cfg = tiny_model_config()
    backend = get_backend("cpu")
    groups = initialize_parallel(backend, layout or ParallelLayout(), seed=seed)
    return LongVitaModel(cfg, backend, groups=groups,
                         context_token_ids=tok.context_token_ids).eval()
