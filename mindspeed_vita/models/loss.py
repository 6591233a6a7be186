"""Loss terms of one rank and their reduction over the data- and context-parallel ranks.

Each rank computes the loss of its own label rows only (its zigzag shard under context
parallelism, its micro batch under data parallelism); logits are never gathered. The mean loss
of the global batch is `sum(loss_sum) / sum(num_tokens)` over the dp x cp group: a training
step backpropagates `loss_sum / global_num_tokens` on every rank and SUMS gradients over dp x cp
(what megatron-core's gradient reduction does with per-token loss).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class LossTerms(NamedTuple):
    """This rank's summed cross entropy (fp32 scalar, differentiable) and its number of label
    tokens (int64 scalar). Unpacks as `loss_sum, num_tokens = model(inputs)`."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor

    def mean(self) -> torch.Tensor:
        """loss_sum / num_tokens (0 when there is no label token)."""
        return self.loss_sum / self.num_tokens.clamp(min=1).to(self.loss_sum.dtype)


def reduce_loss(terms: LossTerms, groups) -> LossTerms:
    """`terms` summed over the dp x cp group of `groups` (`ParallelGroups.dp_cp`; None: one
    process), DETACHED: for logging and for the global token count a step divides by. One
    all-reduce of both values (fp64, so token counts stay exact)."""
    loss_sum = terms.loss_sum.detach()
    group = None if groups is None else groups.dp_cp
    if group is None or dist.get_world_size(group) == 1:
        return LossTerms(loss_sum, terms.num_tokens.detach())
    both = torch.stack([loss_sum.double(), terms.num_tokens.double()])
    dist.all_reduce(both, group=group)
    return LossTerms(both[0].to(loss_sum.dtype), both[1].round().long())
