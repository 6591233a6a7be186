"""Build a `LongVitaModel` from a config and a tokenizer, or from a checkpoint directory.

`load_pretrained` accepts a native checkpoint (docs/checkpoint-format.md) or an HF InternVL
directory (converted in memory); it takes the `ParallelGroups` that
`parallel.process_groups.initialize_parallel` returned, and each tensor-parallel rank takes its own
shard whatever tp size the checkpoint was written at.

`build_meta_model` builds the same model on the `meta` device (shapes and dtypes, no storage), so
the full 14B configuration can be inspected (`parameter_counts`) on any machine.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from pydantic import ValidationError

from backends.base import Backend
from backends.meta import meta_build
from mindspeed_vita.config.model import ModelConfig
from mindspeed_vita.errors import CheckpointError, UserInputError

RECOMPUTE_CHOICES = ("none", "vision", "full")

#: what `checkpoint_kind` returns
NATIVE, HF_INTERNVL, HF_QWEN2, INTERNVIT = "native", "hf-internvl", "hf-qwen2", "internvit"
HF_LONG_VITA = "hf-long-vita"


def build_model(cfg: ModelConfig, backend: Backend, *, groups, tokenizer,
                recompute: str = "none"):
    """A randomly initialised `LongVitaModel` for `cfg` whose context tokens are the
    tokenizer's `<IMG_CONTEXT>`, `<PATCH_CONTEXT>` and `<VID_CONTEXT>`.

    `groups`: the run's `ParallelGroups` (`initialize_parallel`). Raises UserInputError when the tokenizer has ids the
    vocabulary (`language.vocab_size`) cannot embed, or `recompute` is not one of
    none | vision | full.
    """
    from mindspeed_vita.models.vlm import LongVitaModel

    if recompute not in RECOMPUTE_CHOICES:
        raise UserInputError(f"recompute={recompute!r} is not one of "
                             f"{', '.join(RECOMPUTE_CHOICES)}")
    if len(tokenizer) > cfg.language.vocab_size:
        raise UserInputError(
            f"the tokenizer at {tokenizer.path!r} has {len(tokenizer)} ids but "
            f"language.vocab_size={cfg.language.vocab_size}: raise language.vocab_size or import "
            f"the checkpoint with `mindspeed-vita convert import-hf`, which grows it")
    return LongVitaModel(cfg, backend, groups=groups,
                         context_token_ids=sorted(tokenizer.context_token_ids), recompute=recompute)


def build_meta_model(cfg: ModelConfig, backend: Backend, *, groups):
    """A `LongVitaModel` for `cfg` whose parameters live on the `meta` device: every shape and
    dtype as the real model, no memory, no initialisation cost (the 14B model builds in well
    under a second). For parameter counts and shape checks; it cannot run.

    Takes the run's `groups` like `build_model`; under tensor parallel the parameters
    are this rank's shards. The context-token buffer is empty (no tokenizer is needed).
    """
    from mindspeed_vita.models.vlm import LongVitaModel

    with meta_build(backend) as meta_backend:
        model = LongVitaModel(cfg, meta_backend, groups=groups, context_token_ids=())
    on_other_devices = sorted({str(t.device) for t in model.state_dict().values()
                               if isinstance(t, torch.Tensor) and not t.is_meta})
    if on_other_devices:
        raise RuntimeError(f"build_meta_model: some tensors were allocated on "
                           f"{', '.join(on_other_devices)} instead of meta")
    return model


#: the parts `parameter_counts` reports, in model order
PARTS = ("vision", "projector", "language")


def parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    """`{"vision": n, "projector": n, "language": n, "total": n}`: parameters of each part of a
    `LongVitaModel` (this rank's shards under tensor parallel; a tied embedding counts once)."""
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in PARTS}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def checkpoint_kind(path: str) -> str:
    """What the directory `path` holds: "native" (mindspeed_vita.json), "hf-internvl",
    "hf-long-vita" (the Long-VITA release's `_HF` layout), "hf-qwen2" or "internvit" (by
    config.json). CheckpointError naming the path otherwise."""
    from mindspeed_vita.convert.checkpoint import METADATA_FILE
    from mindspeed_vita.convert.hf_internvl import CONFIG_FILE, read_json
    from mindspeed_vita.convert.hf_split import is_internvit_config
    from mindspeed_vita.convert.long_vita import is_long_vita_config

    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return NATIVE
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{path!r} is neither a mindspeed-vita checkpoint ({METADATA_FILE}) nor an HF model "
            f"directory ({CONFIG_FILE})")
    config = read_json(config_path)
    model_type = config.get("model_type")
    if model_type == "internvl":
        return HF_INTERNVL
    if is_long_vita_config(config):
        return HF_LONG_VITA
    if model_type == "qwen2":
        return HF_QWEN2
    if is_internvit_config(config):
        return INTERNVIT
    raise CheckpointError(
        f"{config_path}: model_type {model_type!r} is not supported (expected a mindspeed-vita "
        f"checkpoint, an HF InternVL or Long-VITA directory, a Qwen2 causal LM or an InternViT)")


def _merge(base: dict, update: Mapping[str, Any]) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def updated_config(cfg: ModelConfig, update: Optional[Mapping[str, Any]]) -> ModelConfig:
    """`cfg` with the nested `update` applied (e.g. `{"params_dtype": "float32"}`), validated."""
    if not update:
        return cfg
    try:
        return ModelConfig.model_validate(_merge(cfg.model_dump(), update))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserInputError(f"model config override {where}: {first['msg']}") from exc


def load_pretrained(path: str, backend: Backend, *, groups, recompute: str = "none",
                    config_update: Optional[Mapping[str, Any]] = None
                    ) -> Tuple[Any, Any, ModelConfig]:
    """`(model, tokenizer, cfg)` from a native checkpoint, an HF InternVL directory or a
    Long-VITA release `_HF` directory.

    The tensor-parallel size and rank come from `groups` (`initialize_parallel`); the checkpoint
    may have been written at any tp.
    `config_update` overrides config fields that do not change tensor shapes (dtype, LM head,
    chunk sizes); one that does is reported by the loader naming the tensor.
    """
    from mindspeed_vita.convert.checkpoint import (
        TOKENIZER_DIR, load_checkpoint, load_full_state_into_model, read_metadata)
    from mindspeed_vita.convert.hf_internvl import import_internvl
    from mindspeed_vita.convert.long_vita import import_long_vita
    from mindspeed_vita.data.tokenizer import load_tokenizer

    from mindspeed_vita.training.checkpointing import (
        is_training_checkpoint, latest_checkpoint, load_model_weights, read_training_meta)

    if not is_training_checkpoint(path) and latest_checkpoint(path) is not None:
        path = latest_checkpoint(path)  # a training run directory: its latest checkpoint
    if is_training_checkpoint(path):  # megatron dist_checkpointing, any tp it was written at
        meta = read_training_meta(path)
        tokenizer = load_tokenizer(os.path.join(path, TOKENIZER_DIR))
        cfg = updated_config(ModelConfig.model_validate(meta["model"]), config_update)
        model = build_model(cfg, backend, groups=groups, tokenizer=tokenizer, recompute=recompute)
        load_model_weights(path, model, groups)
        return model, tokenizer, cfg
    kind = checkpoint_kind(path)
    if kind == NATIVE:
        meta = read_metadata(path)
        tokenizer = load_tokenizer(os.path.join(path, TOKENIZER_DIR))
        cfg = updated_config(meta.model_config, config_update)
        model = build_model(cfg, backend, groups=groups, tokenizer=tokenizer, recompute=recompute)
        load_checkpoint(path, model)
        return model, tokenizer, cfg
    if kind in (HF_INTERNVL, HF_LONG_VITA):
        native = import_internvl(path) if kind == HF_INTERNVL else import_long_vita(path)
        cfg = updated_config(native.cfg, config_update)
        model = build_model(cfg, backend, groups=groups, tokenizer=native.tokenizer,
                            recompute=recompute)
        label = "HF InternVL" if kind == HF_INTERNVL else "Long-VITA"
        load_full_state_into_model(model, native.state, native.cfg, f"{label} {path!r}")
        return model, native.tokenizer, cfg
    raise CheckpointError(
        f"{path!r} is a {kind} directory, not a full model: convert it first with "
        f"`mindspeed-vita convert import-hf` (a Qwen2 directory needs --vision INTERNVIT_DIR)")
