"""A training checkpoint as a full (tp=1) native model, for `convert export-hf`.

The checkpoint's dist_checkpointing shards are read into a model built in a one-process world
(any TP / DP / CP size it was written at), then handed on as the state the exporters take.
"""
from __future__ import annotations

import os


def is_training_source(path: str) -> bool:
    """True for a training checkpoint (`iter_N/`) or a run directory with a `latest` marker."""
    from mindspeed_vita.training.checkpointing import LATEST, is_training_checkpoint

    return is_training_checkpoint(path) or os.path.isfile(os.path.join(path, LATEST))


def training_checkpoint_as_native(path: str):
    """`NativeModel` (tp=1 state, config, tokenizer) of training checkpoint / run dir `path`."""
    import torch

    from backends import get_backend
    from mindspeed_vita.convert.checkpoint import NativeModel
    from mindspeed_vita.models.build import load_pretrained
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(), seed=0)
    try:
        model, tokenizer, cfg = load_pretrained(path, backend, groups=groups)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
    finally:
        destroy_parallel()
    return NativeModel(cfg=cfg, state=state, tokenizer=tokenizer)
