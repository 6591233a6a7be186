"""One optimizer step: micro batches accumulated into megatron's gradient buffers, gradients
finalised, a NaN/inf loss skipped, the optimizer and the schedule stepped.

Loss normalisation: the step minimises the mean cross entropy over every label token of the
global batch. Each rank backpropagates `loss_sum * dp_cp / N` where N is the global label count
(known before the first backward, counted on the host from the batches: labels shifted exactly
as `build_model_inputs` shifts them); megatron's DDP then averages gradients over the
dp x cp group, which turns the dp_cp factor into a sum.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from mindspeed_vita.data.types import IGNORE_INDEX, PackedBatch
from mindspeed_vita.models.inputs import shift_labels
from mindspeed_vita.training.optimizer import group_lrs


def label_count(batch: PackedBatch) -> int:
    """Label tokens of a host batch after the shift (the rows that predict a token)."""
    cu = None if batch.cu_seqlens is None else [int(c) for c in batch.cu_seqlens.tolist()]
    return int((shift_labels(batch.labels, cu) != IGNORE_INDEX).sum())


def _all_reduce(values: Sequence[float], group) -> List[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor.tolist()


@dataclass
class StepResult:
    """What one step did (identical on every rank)."""

    loss: float
    grad_norm: float
    skipped: bool
    label_tokens: int
    real_tokens: int
    lr: Dict[str, float]
    seconds: float


def train_step(*, model, ddp_model, optimizer, scheduler, batches: Sequence[PackedBatch],
               groups) -> StepResult:
    """Run the micro `batches` of this rank (the global batch / dp) and step the optimizer.

    A non-finite global loss skips the update (gradients are dropped, the schedule does not
    advance, as megatron does for an overflowing step); the caller counts it."""
    from megatron.core.distributed import finalize_model_grads

    start = time.perf_counter()
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    local_labels = sum(label_count(b) for b in batches)
    real = sum(int(b.num_real_tokens) for b in batches)
    # the batch is shared by the context-parallel ranks: count it over dp only
    global_labels, global_real = _all_reduce([local_labels, real], groups.dp)
    scale = groups.dp_cp_size / max(global_labels, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        terms = ddp_model(model.build_inputs(batch))
        (terms.loss_sum * scale).backward()
        loss_sum += terms.loss_sum.detach().double().cpu()
    (total,) = _all_reduce([float(loss_sum)], groups.dp_cp)
    loss = total / max(global_labels, 1.0)
    if not math.isfinite(loss):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        return StepResult(loss=loss, grad_norm=float("nan"), skipped=True,
                          label_tokens=int(global_labels), real_tokens=int(global_real),
                          lr=group_lrs(optimizer), seconds=time.perf_counter() - start)
    finalize_model_grads([ddp_model])
    _, grad_norm, _ = optimizer.step()
    lrs = group_lrs(optimizer)  # the lr this update used
    scheduler.step(1)
    return StepResult(loss=loss, grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
                      skipped=False, label_tokens=int(global_labels),
                      real_tokens=int(global_real), lr=lrs, seconds=time.perf_counter() - start)
