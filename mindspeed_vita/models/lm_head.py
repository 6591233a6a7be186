"""LM heads: vocabulary projection + cross entropy on the local vocabulary shard.

Every head takes the decoder's final-normed hidden states `[s, b, h]` and the weight of the
vocab-parallel output layer (this rank's shard `[v_local, h]`) and never gathers full logits:
the loss is megatron-core's vocab-parallel cross entropy, in fp32, and inference returns only
the local-vocabulary logits of the rows asked for.

* `FullHead`: logits for every row (the baseline; what megatron's output layer does).
* `ChunkedHead`: rows in chunks of `chunk_size`; each chunk's logits live only while that chunk
  is processed, in forward and in backward, so peak memory is about one chunk of logits.
* `LogitsMaskedHead`: projects only the rows that predict a supervised label.

Labels are already shifted: `labels[b, i]` is the token row `i` must predict, `IGNORE_INDEX`
(-100) means no loss. Rows are flattened sequence-major everywhere: row `r = i * b + j` is
sequence position `i` of batch element `j` (the layout of `hidden.reshape(s * b, h)`).

Tensor parallelism: the head plays the part of megatron's ColumnParallelLinear forward. Without
sequence parallelism the hidden rows go through `copy_to_tensor_model_parallel_region`
(identity forward, all-reduce of the hidden gradient backward); with sequence parallelism the
local sequence shard is all-gathered over TP (`gather_from_sequence_parallel_region`, whose
backward reduce-scatters). The TP group is the one of the `ParallelGroups` the head is built
with (`groups=None`: one rank, no communication); megatron's global `parallel_state` is never
read. The cross entropy is megatron's vocab-parallel one (its `VocabParallelCrossEntropy`
steps), reduced over that group.

Padded vocabulary: the output layer has `V_pad >= vocab_size` rows (padded so every TP rank gets
an equal, aligned slice). A head given the real `vocab_size` sets the logits of the padding ids
(global id >= vocab_size; this rank's first global id is `tp_rank * v_local`) to -inf, so they
take no part in the log-sum-exp of the loss (their gradient is 0) nor in sampling, whatever the
padding rows of the weight hold (zeros after an import, random values after a fresh init).
"""
from __future__ import annotations

import abc
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)

from mindspeed_vita.parallel.groups import ParallelGroups

IGNORE_INDEX = -100
HEAD_NAMES = ("full", "chunked", "logits-masked")


# --------------------------------------------------------------------------- shared pieces
def _tp(groups: Optional[ParallelGroups]) -> Tuple[Any, int, int]:
    """(TP process group, this rank's index in it, its size); (None, 0, 1) without groups."""
    if groups is None:
        return None, 0, 1
    return groups.tp, groups.tp_rank, groups.tp_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """megatron's vocab-parallel cross entropy (no label smoothing) over an explicit TP group:
    megatron's `vocab_parallel_cross_entropy` reads the group from its global parallel_state,
    so the same steps (`VocabParallelCrossEntropy`) are reduced over the given group here.
    NOTE: like megatron's, it works in place on fp32 logits (a float32 input is consumed)."""

    @staticmethod
    def forward(ctx, logits, targets, group, tp_rank, tp_size):
        steps = VocabParallelCrossEntropy
        logits, logits_max = steps.calculate_logits_max(logits)
        if tp_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        v_local = logits.shape[-1]
        first = tp_rank * v_local
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = (
            steps.calculate_predicted_logits(logits, targets, logits_max, first, first + v_local))
        if tp_size > 1:
            dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        softmax, loss = steps.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        steps = VocabParallelCrossEntropy
        grad_2d, arange_1d, update, grad_input = steps.prepare_gradient_calculation_operands(
            softmax, target_mask)
        grad_input = steps.calculate_gradients(grad_2d, arange_1d, masked_target_1d, update,
                                               grad_input, grad_loss)
        return grad_input, None, None, None, None


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor,
                  labels: Optional[torch.Tensor] = None) -> None:
    """Shape / dtype checks with messages that name the argument."""
    if hidden.dim() != 3:
        raise ValueError(f"lm head: hidden must be [s, b, h], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"lm head: weight must be [v_local, h={hidden.shape[2]}], got {tuple(weight.shape)}")
    if labels is None:
        return
    if labels.dim() != 2 or tuple(labels.shape) != (hidden.shape[1], hidden.shape[0]):
        raise ValueError(
            f"lm head: labels must be [b, s] = [{hidden.shape[1]}, {hidden.shape[0]}] (after the "
            f"sequence-parallel gather), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"lm head: labels must be int64/int32 token ids, got {labels.dtype}")


def _check_label_range(targets: torch.Tensor, vocab_local: int, vocab_size: Optional[int],
                       groups: Optional[ParallelGroups]) -> None:
    """Reject labels outside the vocabulary: megatron's cross entropy would silently treat them
    as 'no rank owns this id' and return log-sum-exp as the loss; a padding id (>= the real
    `vocab_size`) has a -inf logit and would give an infinite loss."""
    vocab_total = vocab_local * _tp(groups)[2]
    if vocab_size is not None:
        vocab_total = min(vocab_total, vocab_size)
    supervised = targets != IGNORE_INDEX
    bad = supervised & ((targets < 0) | (targets >= vocab_total))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"lm head: label id {value} is outside the vocabulary [0, {vocab_total}) and is not "
            f"the ignore index {IGNORE_INDEX}")


def _padding_columns(v_local: int, vocab_size: Optional[int],
                     groups: Optional[ParallelGroups]) -> Optional[int]:
    """First local column of this rank's vocabulary shard that is padding (global id >=
    `vocab_size`), or None when the shard has no padding column."""
    if vocab_size is None:
        return None
    offset = _tp(groups)[1] * v_local
    first = max(vocab_size - offset, 0)
    return first if first < v_local else None


def mask_padding_logits_(logits: torch.Tensor, vocab_size: Optional[int],
                         groups: Optional[ParallelGroups] = None) -> torch.Tensor:
    """Set the columns of padding ids of this rank's logits `[..., v_local]` (its shard of the
    TP group of `groups`) to -inf, in place (no second logits-sized buffer; the projection's
    backward does not need its output), and return them. The backward gives those columns a
    zero gradient."""
    first = _padding_columns(logits.shape[-1], vocab_size, groups)
    if first is not None:
        logits[..., first:] = float("-inf")
    return logits


def _tp_rows(hidden: torch.Tensor, sequence_parallel: bool,
             groups: Optional[ParallelGroups]) -> torch.Tensor:
    """Full-sequence hidden `[s, b, h]` as seen by this TP rank (gathered under SP)."""
    group, _, size = _tp(groups)
    if sequence_parallel and size > 1:
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                    group=group)
    return hidden


def _into_tp_region(rows: torch.Tensor, sequence_parallel: bool,
                    groups: Optional[ParallelGroups]) -> torch.Tensor:
    """Mark rows as the input of a column-parallel projection: without SP the hidden gradient
    must be summed over TP ranks (each rank only sees its vocabulary shard). Under SP the
    all-gather's reduce-scatter already sums it."""
    group, _, size = _tp(groups)
    if sequence_parallel or size == 1:
        return rows
    return copy_to_tensor_model_parallel_region(rows, group=group)


def _flatten(hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequence-major rows `[s*b, h]` and their targets `[s*b]`."""
    s, b, h = hidden.shape
    return hidden.reshape(s * b, h), labels.t().reshape(s * b)


def rows_loss_sum(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  vocab_size: Optional[int] = None,
                  groups: Optional[ParallelGroups] = None) -> torch.Tensor:
    """Sum of the fp32 vocab-parallel cross entropy (over the TP group of `groups`) of
    `rows [n, h]` against `targets [n]`; rows whose target is IGNORE_INDEX contribute 0 (value
    and gradient). With `vocab_size`, padding ids (global id >= vocab_size) are left out of
    the softmax."""
    # [n, v_local], in the compute dtype. NOTE: the max is all-reduced over TP before it is
    # subtracted, so a shard of only -inf columns gives exp() = 0 there, never NaN.
    logits = mask_padding_logits_(F.linear(rows, weight), vocab_size, groups)
    per_row = _VocabParallelCrossEntropy.apply(logits, targets, *_tp(groups))  # fp32 [n]
    # NOTE: megatron's cross entropy gives ignored rows their log-sum-exp, not 0: mask it out.
    per_row = torch.where(targets != IGNORE_INDEX, per_row, per_row.new_zeros(()))
    return per_row.sum()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss of `rows @ weight.T` against targets, processed `chunk_size` rows at a time.

    Forward computes each chunk's loss AND, when gradients are wanted, that chunk's gradients
    right away, then drops the chunk's logits; only the gradient buffers (the size of rows and of
    weight) are kept for backward, which merely scales them by the incoming gradient. Peak memory
    is therefore one chunk of logits instead of all of them, with no recomputation. The weight
    gradient is accumulated in fp32 across chunks.
    """

    @staticmethod
    def forward(ctx, rows, weight, targets, chunk_size, vocab_size, groups):
        want_grad_rows, want_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.zeros_like(rows) if want_grad_rows else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if want_grad_weight else None)
        for start in range(0, rows.shape[0], chunk_size):
            chunk_rows = rows[start:start + chunk_size]
            chunk_targets = targets[start:start + chunk_size]
            if not (want_grad_rows or want_grad_weight):
                loss_sum += rows_loss_sum(chunk_rows, weight, chunk_targets, vocab_size,
                                          groups)
                continue
            with torch.enable_grad():
                rows_leaf = chunk_rows.detach().requires_grad_(want_grad_rows)
                weight_leaf = weight.detach().requires_grad_(want_grad_weight)
                chunk_loss = rows_loss_sum(rows_leaf, weight_leaf, chunk_targets, vocab_size,
                                           groups)
                leaves = [t for t in (rows_leaf, weight_leaf) if t.requires_grad]
                grads = list(torch.autograd.grad(chunk_loss, leaves))
            if want_grad_rows:
                grad_rows[start:start + chunk_size] = grads.pop(0)
            if want_grad_weight:
                grad_weight += grads.pop(0)
            loss_sum += chunk_loss.detach()
        ctx.save_for_backward(grad_rows, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_rows, grad_weight = ctx.saved_tensors
        if grad_rows is not None:
            grad_rows = grad_rows * grad_loss.to(grad_rows.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_rows, grad_weight, None, None, None, None


# ------------------------------------------------------------------------------- the heads
class LMHead(abc.ABC):
    """Vocabulary projection + loss. All heads give the same values; they differ in memory and
    time. Use `build_lm_head` to make one from the config name.

    `vocab_size`: the real vocabulary size (`language.vocab_size`); the logits of padding ids
    beyond it are -inf in the loss and in the returned logits. None: every column is real.
    `groups`: the model's `ParallelGroups`; the vocabulary is split over its TP group (None:
    one rank holds the whole vocabulary).
    """

    name: str = ""

    def __init__(self, vocab_size: Optional[int] = None, *,
                 groups: Optional[ParallelGroups] = None) -> None:
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"lm head: vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.groups = groups

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
             sequence_parallel: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Summed cross entropy over supervised rows and their count.

        hidden: `[s, b, h]` final-normed decoder output (the local sequence shard `[s/tp, b, h]`
        when `sequence_parallel`); weight: this rank's vocabulary shard `[v_local, h]`;
        labels: `[b, s]` already shifted, IGNORE_INDEX = no loss (full sequence under SP).
        Returns `(loss_sum, num_label_tokens)`: an fp32 scalar (differentiable w.r.t. hidden and
        weight) and an int64 scalar tensor. The caller divides and all-reduces over DP/CP.
        """
        rows_all = _tp_rows(hidden, sequence_parallel, self.groups)
        _check_inputs(rows_all, weight, labels)
        rows, targets = _flatten(rows_all, labels.long())
        _check_label_range(targets, weight.shape[0], self.vocab_size, self.groups)
        num_label_tokens = (targets != IGNORE_INDEX).sum()
        return self._loss_sum(rows, weight, targets, sequence_parallel), num_label_tokens

    @abc.abstractmethod
    def _loss_sum(self, rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  sequence_parallel: bool) -> torch.Tensor:
        """fp32 loss summed over `rows [n, h]` (full sequence, flattened) with `targets [n]`."""

    def logits_for_rows(self, hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, *,
                        sequence_parallel: bool = False) -> torch.Tensor:
        """Local-vocabulary logits `[n_rows, v_local]` (compute dtype) of the given rows, -inf in
        the columns of padding ids.

        `rows` is a 1-D int tensor of sequence-major row indices (`pos * b + batch`) into the
        full sequence. The caller all-gathers the vocabulary shards of this small result.
        """
        hidden = _tp_rows(hidden, sequence_parallel, self.groups)
        _check_inputs(hidden, weight)
        rows = torch.as_tensor(rows, device=hidden.device).long().reshape(-1)
        n = hidden.shape[0] * hidden.shape[1]
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise ValueError(f"lm head: row indices must lie in [0, {n}) for hidden of shape "
                             f"{tuple(hidden.shape)}, got range [{int(rows.min())}, "
                             f"{int(rows.max())}]")
        logits = self._logits_for_rows(hidden.reshape(n, hidden.shape[2]), weight, rows)
        return mask_padding_logits_(logits, self.vocab_size, self.groups)

    def last_row_logits(self, hidden: torch.Tensor, weight: torch.Tensor, *,
                        sequence_parallel: bool = False) -> torch.Tensor:
        """Local-vocabulary logits `[b, v_local]` of the last sequence position of every batch
        element: what decoding needs to pick the next token."""
        s = hidden.shape[0] * (_tp(self.groups)[2] if sequence_parallel else 1)
        b = hidden.shape[1]
        rows = torch.arange((s - 1) * b, s * b, device=hidden.device)
        return self.logits_for_rows(hidden, weight, rows, sequence_parallel=sequence_parallel)

    @abc.abstractmethod
    def _logits_for_rows(self, flat: torch.Tensor, weight: torch.Tensor,
                         rows: torch.Tensor) -> torch.Tensor:
        """Logits of `flat[rows]` computed the way this head computes logits."""


class FullHead(LMHead):
    """Logits for every row, then the loss: the baseline the other heads are measured against."""

    name = "full"

    def _loss_sum(self, rows, weight, targets, sequence_parallel):
        return rows_loss_sum(_into_tp_region(rows, sequence_parallel, self.groups), weight,
                             targets, self.vocab_size, self.groups)

    def _logits_for_rows(self, flat, weight, rows):
        # The original inference path: project the whole sequence, keep the rows asked for.
        return F.linear(flat, weight).index_select(0, rows)


class ChunkedHead(LMHead):
    """Rows in chunks of `chunk_size`; each chunk's logits are released before the next."""

    name = "chunked"

    def __init__(self, chunk_size: int, vocab_size: Optional[int] = None, *,
                 groups: Optional[ParallelGroups] = None) -> None:
        super().__init__(vocab_size, groups=groups)
        if chunk_size <= 0:
            raise ValueError(f"lm head: lm_head_chunk_size must be positive, got {chunk_size}")
        self.chunk_size = int(chunk_size)

    def _loss_sum(self, rows, weight, targets, sequence_parallel):
        rows = _into_tp_region(rows, sequence_parallel, self.groups)
        return _ChunkedLinearCrossEntropy.apply(rows, weight, targets, self.chunk_size,
                                                self.vocab_size, self.groups)

    def _logits_for_rows(self, flat, weight, rows):
        # Chunked inference path: project the sequence chunk by chunk (peak one chunk of
        # logits), keeping the requested rows of each chunk in the caller's order.
        out = flat.new_empty((rows.numel(), weight.shape[0]))
        for start in range(0, flat.shape[0], self.chunk_size):
            in_chunk = ((rows >= start) & (rows < start + self.chunk_size)).nonzero().squeeze(1)
            if in_chunk.numel():
                chunk_logits = F.linear(flat[start:start + self.chunk_size], weight)
                out[in_chunk] = chunk_logits.index_select(0, rows[in_chunk] - start)
        return out


class LogitsMaskedHead(LMHead):
    """Only the rows that predict a supervised label go through the vocabulary projection.

    Because labels are shifted, row `i` predicts `labels[i]`: the rows kept are exactly those
    with `labels[i] != IGNORE_INDEX`. (The authors' release built the mask from the unshifted
    label positions and so dropped the first token of every answer span.)

    With `chunk_size`, more selected rows than that are projected `chunk_size` at a time, as the
    chunked head does, so even a batch that is mostly answer tokens peaks at one chunk of logits;
    up to `chunk_size` selected rows take the plain single projection.
    """

    name = "logits-masked"

    def __init__(self, vocab_size: Optional[int] = None, chunk_size: Optional[int] = None, *,
                 groups: Optional[ParallelGroups] = None) -> None:
        super().__init__(vocab_size, groups=groups)
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"lm head: lm_head_chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size

    @staticmethod
    def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
        """Sequence-major indices of the rows that predict a label, for labels `[b, s]`."""
        return (labels.t().reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)

    def _loss_sum(self, rows, weight, targets, sequence_parallel):
        selected = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        # Select first, then enter the TP region: the backward all-reduce only moves the
        # selected rows. Every TP rank holds the same labels, so the selections agree.
        chosen = _into_tp_region(rows.index_select(0, selected), sequence_parallel, self.groups)
        chosen_targets = targets.index_select(0, selected)
        if self.chunk_size is not None and chosen.shape[0] > self.chunk_size:
            return _ChunkedLinearCrossEntropy.apply(chosen, weight, chosen_targets,
                                                    self.chunk_size, self.vocab_size,
                                                    self.groups)
        return rows_loss_sum(chosen, weight, chosen_targets, self.vocab_size, self.groups)

    def _logits_for_rows(self, flat, weight, rows):
        return F.linear(flat.index_select(0, rows), weight)


def build_lm_head(name: str, chunk_size: int = 4096, vocab_size: Optional[int] = None, *,
                  groups: Optional[ParallelGroups] = None) -> LMHead:
    """The head the config key `model.lm_head` names; `chunk_size` is
    `model.lm_head_chunk_size` (rows per projection of the chunked head, and of the
    logits-masked head when it selects more rows than that); `vocab_size` is the real
    vocabulary size `language.vocab_size` (the padding ids beyond it are masked), None when
    the weight has no padding rows; `groups`: the model's `ParallelGroups` (TP group of the
    vocabulary split; None: one rank)."""
    if name == "full":
        return FullHead(vocab_size, groups=groups)
    if name == "chunked":
        return ChunkedHead(chunk_size, vocab_size, groups=groups)
    if name == "logits-masked":
        return LogitsMaskedHead(vocab_size, chunk_size, groups=groups)
    raise ValueError(f"model.lm_head: unknown head {name!r}; choose one of {', '.join(HEAD_NAMES)}")


__all__ = ["IGNORE_INDEX", "HEAD_NAMES", "LMHead", "FullHead", "ChunkedHead", "LogitsMaskedHead",
           "build_lm_head", "mask_padding_logits_", "rows_loss_sum"]
