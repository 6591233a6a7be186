"""Optimizer and learning-rate schedule of a stage, built through megatron-core.

* Freezing: `training.trainable` names the parts (vision / projector / language) that train;
  the others get `requires_grad=False` before the model is wrapped, so megatron's DDP allocates
  no gradient buffer for them and the optimizer never sees them.
* Learning rates: one megatron param-group override (`max_lr`, `min_lr`) per ViT depth.
  Stage 2 trains the ViT at `lr * vision_lr_mult * vision_layer_decay ** (L + 1 - layer_id)`
  where L is the number of ViT layers, the patch / position / class embeddings are layer 0,
  block i is layer i + 1 and anything after the blocks is layer L + 1 (docs/long-vita.md, stage
  table: lr x 0.1 x 0.9^(25 - layer) for the 24-layer InternViT). min_lr scales by the same
  factor, so every group follows the same cosine shape.
* Weight decay: megatron's rule, none on biases and 1-D parameters (norm weights, layer scales).
* Adam betas / eps, gradient clipping, bf16 with fp32 master weights (megatron's mixed-precision
  optimizer when the parameters are 16-bit), and the distributed optimizer when
  `training.distributed_optimizer` is set.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

from mindspeed_vita.config.schema import ConfigError, TrainingConfig

logger = logging.getLogger(__name__)

#: the parts `training.trainable` can name, as attributes of `LongVitaModel`
PARTS = ("vision", "projector", "language")
#: ViT parameters that count as layer 0 (embeddings before the first block)
_VIT_EMBEDDINGS = ("class_embedding", "position_embedding", "patch_embedding")
_VIT_BLOCK = re.compile(r"vision\.layers\.(\d+)\.")
_VIT_PARAM = re.compile(r"vision\.(\w+)")


def apply_freezing(model: torch.nn.Module, trainable: Sequence[str]) -> Dict[str, int]:
    """Set `requires_grad` of every parameter of `model`'s parts from `training.trainable`.

    Returns the trainable parameter count per part. Raises ConfigError naming the key when
    nothing would train (a stage that freezes everything cannot take a step).
    """
    unknown = sorted(set(trainable) - set(PARTS))
    if unknown:
        raise ConfigError(f"config key 'training.trainable' names {unknown}, not parts of the "
                          f"model ({', '.join(PARTS)})")
    counts = {}
    for part in PARTS:
        train = part in trainable
        n = 0
        for param in getattr(model, part).parameters():
            param.requires_grad_(train)
            n += param.numel() if train else 0
        counts[part] = n
    if not any(counts.values()):
        raise ConfigError(
            f"config key 'training.trainable' = {list(trainable)} leaves no parameter to train "
            f"(every part of the model is frozen); name at least one of {', '.join(PARTS)}")
    return counts


def vision_layer_id(name: str, num_layers: int) -> int:
    """Depth of a ViT parameter for the layer-wise lr decay: 0 for the embeddings, i + 1 for
    block i, `num_layers + 1` for anything after the blocks. `name` may carry a prefix."""
    name = model_name(name)
    block = _VIT_BLOCK.match(name)
    if block:
        return int(block.group(1)) + 1
    first = _VIT_PARAM.match(name)
    if first and first.group(1) in _VIT_EMBEDDINGS:
        return 0
    return num_layers + 1


def vision_lr_factor(name: str, training: TrainingConfig, num_layers: int) -> float:
    """Multiplier of the stage lr for the ViT parameter `name`."""
    depth = vision_layer_id(name, num_layers)
    return training.vision_lr_mult * training.vision_layer_decay ** (num_layers + 1 - depth)


def model_name(name: str) -> str:
    """A parameter name without the `module.` prefixes wrappers (megatron DDP) add."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _is_vision(name: str) -> bool:
    return model_name(name).startswith("vision.")


def lr_overrides(model: torch.nn.Module, training: TrainingConfig, num_vision_layers: int):
    """megatron `config_overrides` for the stage: megatron's no-weight-decay rule plus one
    `max_lr` / `min_lr` override per distinct ViT lr factor (keyed by exact parameter names,
    so they work whatever prefix a wrapper adds). Also names each lr group for the metrics."""
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_standard_config_overrides

    base = OptimizerConfig(lr=training.lr, min_lr=training.min_lr,
                           weight_decay=training.weight_decay)
    overrides = dict(get_standard_config_overrides(base))
    by_factor: Dict[float, List[str]] = defaultdict(list)
    depth_of: Dict[float, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or not _is_vision(name):
            continue
        factor = vision_lr_factor(name, training, num_vision_layers)
        if factor != 1.0:
            by_factor[factor].append(name)
            depth_of[factor] = vision_layer_id(name, num_vision_layers)
    for factor, names in sorted(by_factor.items()):
        # NOTE: megatron 0.16's scheduler reads max_lr / min_lr; lr_mult is recorded too because
        # the distributed optimizer matches saved groups to live ones by (wd_mult, lr_mult, ...)
        # when a checkpoint loads: without it every ViT depth would look like the same group.
        overrides[ParamKey(name=tuple(names))] = {
            "max_lr": training.lr * factor, "min_lr": training.min_lr * factor,
            "lr_mult": factor, "group_name": f"vision.layer{depth_of[factor]}"}
    return overrides


def optimizer_config(training: TrainingConfig, *, params_dtype: torch.dtype,
                     distributed: bool):
    """megatron `OptimizerConfig` of the stage (Adam, clipping, bf16 master weights)."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam", lr=training.lr, min_lr=training.min_lr,
        weight_decay=training.weight_decay, adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2, adam_eps=training.adam_eps,
        clip_grad=training.clip_grad, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, params_dtype=params_dtype,
        use_distributed_optimizer=distributed)


def build_optimizer(ddp_model, training: TrainingConfig, *, params_dtype: torch.dtype,
                    num_vision_layers: int, distributed: bool):
    """The megatron optimizer over `ddp_model` (a megatron `DistributedDataParallel`) with the
    stage's groups. `distributed` selects megatron's distributed optimizer (optimizer state
    sharded over the data-parallel x context-parallel ranks)."""
    from megatron.core.optimizer import get_megatron_optimizer

    config = optimizer_config(training, params_dtype=params_dtype, distributed=distributed)
    overrides = lr_overrides(ddp_model, training, num_vision_layers)
    return get_megatron_optimizer(config, [ddp_model], config_overrides=overrides)


def warmup_steps(training: TrainingConfig) -> int:
    """Warmup length in optimizer steps (`warmup_fraction` of `train_iters`, rounded)."""
    return int(round(training.warmup_fraction * training.train_iters))


def build_scheduler(optimizer, training: TrainingConfig):
    """megatron `OptimizerParamScheduler`: linear warmup from 0, then `lr_decay_style` to
    min_lr at `train_iters`; constant weight decay. Each group's own max/min lr is honoured."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=training.lr, min_lr=training.min_lr,
        lr_warmup_steps=warmup_steps(training), lr_decay_steps=training.train_iters,
        lr_decay_style=training.lr_decay_style, start_wd=training.weight_decay,
        end_wd=training.weight_decay, wd_incr_steps=training.train_iters,
        wd_incr_style="constant")


def group_lrs(optimizer) -> Dict[str, float]:
    """Current lr per named group: `default` for the stage lr, `vision.layerN` for the ViT
    depths with their own lr (groups that differ only in weight decay share a name)."""
    lrs: Dict[str, float] = {}
    for group in optimizer.param_groups:
        lrs.setdefault(group.get("group_name", "default"), float(group["lr"]))
    return lrs
