"""Visual units under context parallelism: who encodes which tile, and how its rows travel.

A packed batch's visual units (image tiles, thumbnails, video frames) each fill
`tokens_per_tile` context-token rows, in order: the c-th context token of the batch (row-major
over [b, s]) takes feature row c, i.e. row `c % tokens_per_tile` of unit `c // tokens_per_tile`.
Under context parallelism (CP) every rank holds only its zigzag slices of the sequence, so:

* each unit is encoded by exactly ONE rank of the CP group, and every rank encodes
  `n // cp` or `n // cp + 1` units (balanced within one unit); a unit goes to the rank that
  holds most of its rows when the balance allows it, so most rows never leave their encoder;
* after encoding, one all-to-all moves every feature row to the rank whose slice holds its
  context token - including a unit whose rows straddle two slices or two ranks - and its
  backward sends each row's gradient back to the rank that encoded the unit.

`plan_visual_exchange` computes the plan on the host from the batch alone, so every rank of
the CP group computes the same plan without talking to the others. At CP 1 the plan degenerates
to "encode everything, write row c to the c-th context token" and nothing is exchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VisualPlan:
    """One rank's part of the visual work of a batch (host tensors, int64).

    `units`: global indices of the units this rank encodes, ascending (its encoder input is
    `pixel_values[units]`, its feature rows are `[len(units) * tokens_per_tile, h]`).
    `send_index`: rows of this rank's feature rows to send, grouped by destination rank
    (`send_splits[j]` rows go to rank j, in ascending context order).
    `recv_splits[i]`: rows received from rank i (concatenated in rank order).
    `context_rows`: for every received row, the sequence-major row (`pos * b + batch`) of this
    rank's local `[s_local, b]` shard where it goes.
    `units_per_rank`: how many units each CP rank encodes (for balance checks and logs).
    """

    units: torch.Tensor
    send_index: torch.Tensor
    send_splits: Tuple[int, ...]
    recv_splits: Tuple[int, ...]
    context_rows: torch.Tensor
    units_per_rank: Tuple[int, ...]


def assign_units(rows_held: torch.Tensor) -> torch.Tensor:
    """Encoder rank of each unit, from `rows_held [n_units, cp]` (rows of unit u in rank r's
    slices). Every rank gets `n // cp` or `n // cp + 1` units; within that, a unit goes to the
    rank holding most of its rows (lowest rank on ties) whenever that rank still has room.
    Deterministic, so every rank computes the same assignment."""
    n, cp = rows_held.shape
    base, extra = divmod(n, cp)
    owner = torch.full((n,), -1, dtype=torch.long)
    load = [0] * cp
    preferred = rows_held.argmax(dim=1).tolist() if n else []
    # pass 1: preferred ranks up to the even share
    for unit, rank in enumerate(preferred):
        if load[rank] < base:
            owner[unit] = rank
            load[rank] += 1
    # pass 2: the rest to the preferred rank if it may take one more (base + 1 is allowed for
    # `extra` ranks), else to the least loaded rank that may still take one
    extra_left = extra
    for unit in (owner < 0).nonzero().flatten().tolist():
        rank = preferred[unit]
        if not (load[rank] < base or (load[rank] == base and extra_left > 0)):
            candidates = [r for r in range(cp) if load[r] < base] or \
                [r for r in range(cp) if load[r] == base]
            rank = min(candidates, key=lambda r: (load[r], r))
        if load[rank] == base:
            extra_left -= 1
        owner[unit] = rank
        load[rank] += 1
    return owner


def plan_visual_exchange(is_context: torch.Tensor, shard_positions: Sequence[torch.Tensor],
                         tokens_per_tile: int, cp_rank: int) -> VisualPlan:
    """The plan of rank `cp_rank` for a batch.

    is_context: bool `[b, s]`, the full batch's context-token positions (host).
    shard_positions: per CP rank, int64 `[b, s_local]`: the row-major flat position
        (`batch * s + pos`) in the full batch of each token of that rank's local shard.
    The number of context tokens must be a multiple of `tokens_per_tile` (checked by the
    caller against the pixel count).
    """
    cp = len(shard_positions)
    flat_context = is_context.reshape(-1)
    n_context = int(flat_context.sum())
    n_units = n_context // tokens_per_tile
    ordinal = torch.where(flat_context, flat_context.long().cumsum(0) - 1,
                          torch.full_like(flat_context, -1, dtype=torch.long))
    # per rank: the context ordinals in its shard (ascending) and their local sequence-major rows
    held: List[Tuple[torch.Tensor, torch.Tensor]] = []
    rows_held = torch.zeros(n_units, cp, dtype=torch.long)
    for rank, positions in enumerate(shard_positions):
        local = ordinal[positions.reshape(-1)].view_as(positions).t().reshape(-1)  # seq-major
        rows = (local >= 0).nonzero().flatten()
        # ascending context order without a sort (O(n)): scatter each row to its ordinal
        row_of = torch.full((n_context,), -1, dtype=torch.long)
        row_of[local[rows]] = rows
        ords = (row_of >= 0).nonzero().flatten()
        held.append((ords, row_of[ords]))
        rows_held[:, rank] = torch.bincount(ords // tokens_per_tile, minlength=n_units)
    if int(rows_held.sum()) != n_context:
        raise ValueError(f"the CP shards hold {int(rows_held.sum())} context tokens, the batch "
                         f"has {n_context}: the shards must cover the batch exactly once")
    owner = assign_units(rows_held)
    units = (owner == cp_rank).nonzero().flatten()
    # local feature row of every ordinal on its encoder: unit's rank among the encoder's units
    slot = torch.zeros(n_units, dtype=torch.long)
    for rank in range(cp):
        mine = (owner == rank).nonzero().flatten()
        slot[mine] = torch.arange(mine.numel())
    send_parts, send_splits = [], []
    for ords, _ in held:
        from_me = ords[owner[ords // tokens_per_tile] == cp_rank]  # ascending context order
        send_parts.append(slot[from_me // tokens_per_tile] * tokens_per_tile
                          + from_me % tokens_per_tile)
        send_splits.append(int(from_me.numel()))
    ords, rows = held[cp_rank]
    source = owner[ords // tokens_per_tile]
    # received rows come by source rank, each source's in ascending context order
    from_source = [rows[source == rank] for rank in range(cp)]
    return VisualPlan(
        units=units, send_index=torch.cat(send_parts) if send_parts else units.new_zeros(0),
        send_splits=tuple(send_splits), recv_splits=tuple(int(r.numel()) for r in from_source),
        context_rows=torch.cat(from_source),
        units_per_rank=tuple(int(n) for n in torch.bincount(owner, minlength=cp).tolist()))


class _ExchangeRows(torch.autograd.Function):
    """All-to-all of feature rows over the CP group; backward sends gradients back the other
    way, so each row's gradient lands on the rank that encoded it."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), list(recv_splits), list(send_splits),
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad = grad_out.new_empty((sum(send_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad, grad_out.contiguous(), list(send_splits), list(recv_splits),
                               group=ctx.group)
        return grad, None, None, None


def exchange_feature_rows(features: torch.Tensor, send_index: torch.Tensor,
                          send_splits: Sequence[int], recv_splits: Sequence[int],
                          group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """This rank's encoded feature rows `[n_mine * tokens_per_tile, h]` -> the rows its own
    slices need `[sum(recv_splits), h]`, in the plan's receive order. Differentiable; with a
    group of one rank (or none) it is a plain row selection."""
    rows = features.index_select(0, send_index)
    if group is None or dist.get_world_size(group) == 1:
        return rows
    return _ExchangeRows.apply(rows, tuple(send_splits), tuple(recv_splits), group)
