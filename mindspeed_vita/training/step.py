"""One optimizer step: micro batches accumulated into megatron's gradient buffers, gradients
finalised, a NaN/inf loss skipped, the optimizer and the schedule stepped.

Loss normalisation: the step minimises the mean cross entropy over every label token of the
global batch. Each rank backpropagates `loss_sum * dp_cp / N` where N is the global label count
(known before the first backward, counted on the host from the batches: labels shifted exactly
as `build_model_inputs` shifts them); megatron's DDP then averages gradients over the
dp x cp group, which turns the dp_cp factor into a sum.

Skipping a step: megatron's optimizers refuse an update only when a gradient scaler finds an
inf (fp16); bf16 (no scaler) and fp32 check nothing, and clipping by a NaN norm writes NaN into
every parameter. `optimizer_step` therefore runs megatron's step in its public parts (prepare
grads, global norm, clip, update) and refuses the update, for every dtype alike, when the loss
or the global gradient norm is not finite on any rank. A refused step leaves parameters,
optimizer state and schedule exactly as they were.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from mindspeed_vita.data.types import IGNORE_INDEX, PackedBatch
from mindspeed_vita.models.inputs import shift_labels
from mindspeed_vita.training.optimizer import group_lrs


def label_count(batch: PackedBatch) -> int:
    """Label tokens of a host batch after the shift (the rows that predict a token)."""
    cu = None if batch.cu_seqlens is None else [int(c) for c in batch.cu_seqlens.tolist()]
    return int((shift_labels(batch.labels, cu) != IGNORE_INDEX).sum())


def all_reduce_values(values: Sequence[float], group, op=dist.ReduceOp.SUM,
                      device: Optional[torch.device] = None) -> List[float]:
    """Host numbers reduced over `group` (None or one rank: returned as they are), in fp64 so
    token counts stay exact. `device`: where the collective runs - the model's device, since
    NCCL / HCCL groups reduce device tensors only (gloo: the CPU)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor.tolist()


def _any_rank(flag: bool, device: Optional[torch.device]) -> bool:
    """True when `flag` is set on any rank of the world (every rank gets the same answer)."""
    world = dist.group.WORLD if dist.is_initialized() else None
    (value,) = all_reduce_values([1.0 if flag else 0.0], world, op=dist.ReduceOp.MAX,
                                 device=device)
    return value > 0


def optimizer_step(optimizer, device: Optional[torch.device] = None) -> Tuple[bool, float]:
    """megatron's optimizer step, refused when the gradients are not finite.

    Runs what megatron's `ChainedOptimizer.step` runs, in the same order: prepare the grads
    (copy to the fp32 main grads; fp16: unscale and check for inf), the global gradient norm,
    clipping by that norm, the update. Between the norm and the clipping it stops when the norm
    is NaN/inf or the scaler found an inf on any rank (`device`: where that flag is reduced).
    Returns (updated, grad_norm)."""
    # NOTE: the clip function is looked up in megatron's optimizer module at call time, where
    # the backend's engine adaptations (backends/megatron_cpu.py) replace it on CPU
    from megatron.core.optimizer import optimizer as megatron_optimizer

    found_inf = optimizer.prepare_grads()
    # global over megatron's grad-stats group (model parallel, + dp for the distributed optimizer)
    grad_norm = float(optimizer.get_grad_norm())
    if _any_rank(found_inf or not math.isfinite(grad_norm), device):
        return False, grad_norm
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0.0:
            continue
        params = sub.get_parameters()
        if params:
            megatron_optimizer.clip_grad_by_total_norm_fp32(
                params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def _poison_grad(ddp_model) -> None:
    """Fault injection: an inf in the first trainable parameter's gradient buffer."""
    for param in ddp_model.parameters():
        if param.requires_grad:
            param.main_grad.view(-1)[0] = float("inf")
            return


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
    skip_reason: Optional[str] = None  # "non-finite loss" | "non-finite gradient norm"


def train_step(*, model, ddp_model, optimizer, scheduler, batches: Sequence[PackedBatch],
               groups, poison_loss: bool = False, poison_grad: bool = False) -> StepResult:
    """Run the micro `batches` of this rank (the global batch / dp) and step the optimizer.

    A non-finite global loss or gradient norm skips the update (gradients are dropped, the
    schedule does not advance, as megatron does for an overflowing fp16 step); the caller
    counts it. `poison_loss` / `poison_grad` inject a NaN loss / an inf gradient on this rank
    (`training.fault_injection`)."""
    from megatron.core.distributed import finalize_model_grads

    start = time.perf_counter()
    device = next(model.parameters()).device
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    local_labels = sum(label_count(b) for b in batches)
    real = sum(int(b.num_real_tokens) for b in batches)
    # the batch is shared by the context-parallel ranks: count it over dp only
    global_labels, global_real = all_reduce_values([local_labels, real], groups.dp,
                                                   device=device)
    scale = groups.dp_cp_size / max(global_labels, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        terms = ddp_model(model.build_inputs(batch))
        local = terms.loss_sum * float("nan") if poison_loss else terms.loss_sum
        (local * scale).backward()
        loss_sum += local.detach().double().cpu()
    # NaN on one rank makes the sum NaN on all: every rank of dp x cp takes the same branch
    (total,) = all_reduce_values([float(loss_sum)], groups.dp_cp, device=device)
    loss = total / max(global_labels, 1.0)

    def result(skip_reason, grad_norm, lrs):
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=skip_reason is not None,
                          label_tokens=int(global_labels), real_tokens=int(global_real),
                          lr=lrs, seconds=time.perf_counter() - start, skip_reason=skip_reason)

    if not math.isfinite(loss):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        return result("non-finite loss", float("nan"), group_lrs(optimizer))
    if poison_grad:
        _poison_grad(ddp_model)
    finalize_model_grads([ddp_model])
    lrs = group_lrs(optimizer)  # the lr this update uses
    updated, grad_norm = optimizer_step(optimizer, device)
    if not updated:
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        return result("non-finite gradient norm", grad_norm, lrs)
    scheduler.step(1)
    return result(None, grad_norm, lrs)
