"""Zigzag ("dual chunk swap") sharding of a packed batch across the context-parallel group.

Every attention segment is cut into 2*cp equal chunks and rank r keeps chunk r followed by
chunk 2*cp-1-r. Under causal attention each rank then owns the same amount of work (one early
and one late chunk), which is what makes every ring-attention step cost the same half block.

* reset mode (stages 1-2): every packed sample - and a row's trailing padding segment - is a
  segment of its own (the batch's `cu_seqlens` over the flattened `b*s` tokens), split alone.
  Each segment's length must be a multiple of 2*cp (the packer pads samples to it).
* joint mode (stages 3-4): each `[b, s]` row is one segment.

A `ZigzagShard` is built once per batch on the host (plain ints) and then shards any tensor
whose first two dims are `[b, s]` (tokens, position ids, shifted labels, loss mask, embeddings)
to this rank's `[b, s/cp, ...]`, with the local cumulative lengths for the varlen kernels and
the map local row -> global position (for routing visual features). Because every segment
shrinks by exactly cp, the local rows keep the batch's row structure: each local row is the
concatenation of its segments' local parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def _validated_lengths(cu_seqlens: Sequence[int], total: int, cp_size: int) -> Tuple[int, ...]:
    """Segment lengths from host cumulative lengths, refusing what zigzag cannot split."""
    cu = [int(x) for x in cu_seqlens]
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start with 0, hold at least one segment and be "
                         f"non-decreasing, got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but the batch holds {total} tokens "
                         "(b * s, padding included as its own segment)")
    lengths = tuple(b - a for a, b in zip(cu, cu[1:]))
    chunks = 2 * cp_size
    for i, length in enumerate(lengths):
        if length % chunks:
            raise ValueError(
                f"packed sample {i} has {length} tokens, not a multiple of 2 * cp = {chunks}: "
                f"zigzag context parallelism cuts every sample into {chunks} equal chunks; pad "
                "samples to a multiple of 2 * cp (packing segment_multiple)")
    return lengths


def zigzag_positions(lengths: Sequence[int], cp_size: int, cp_rank: int) -> Tuple[int, ...]:
    """Global flat positions of rank `cp_rank`'s tokens, in local order.

    `lengths` are consecutive segments of one flat axis, each a multiple of 2*cp_size.
    """
    positions = []
    start = 0
    for length in lengths:
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            first = start + c * chunk
            positions.extend(range(first, first + chunk))
        start += length
    return tuple(positions)


@dataclass(frozen=True)
class ZigzagShard:
    """This rank's zigzag slice of one `[b, s]` batch; host ints only, built once per batch.

    Attributes:
        cp_size, cp_rank: the context-parallel group size and this rank's index in it.
        batch, seq_len: the global `[b, s]` shape.
        packed: reset mode (segments from cu_seqlens) vs joint (one segment per row).
        seqlens: global segment lengths over the flattened `b*s` tokens.
        local_seqlens: this rank's length of every segment (`seqlens[i] / cp`).
        local_cu_seqlens: cumulative `local_seqlens` with a leading 0 (varlen kernels).
        positions: flat global position (row * s + column) of every local flat row.
    """

    cp_size: int
    cp_rank: int
    batch: int
    seq_len: int
    packed: bool
    seqlens: Tuple[int, ...]
    local_seqlens: Tuple[int, ...]
    local_cu_seqlens: Tuple[int, ...]
    positions: Tuple[int, ...]

    @classmethod
    def build(cls, batch: int, seq_len: int, cp_size: int, cp_rank: int,
              cu_seqlens: Optional[Sequence[int]] = None) -> "ZigzagShard":
        """Plan rank `cp_rank`'s shard of a `[batch, seq_len]` batch.

        `cu_seqlens` (host ints, leading 0, over the flattened `batch*seq_len` tokens): reset
        mode, each segment split alone; None: joint mode, each row split as one sequence.
        Raises ValueError naming the segment when one is not a multiple of 2*cp_size.
        """
        if cp_size < 1 or not 0 <= cp_rank < cp_size:
            raise ValueError(f"cp_rank {cp_rank} is not in a context-parallel group of {cp_size}")
        total = batch * seq_len
        if cu_seqlens is None:
            if seq_len % (2 * cp_size):
                raise ValueError(f"sequence length {seq_len} is not a multiple of 2 * cp = "
                                 f"{2 * cp_size}: zigzag context parallelism cuts every row "
                                 f"into {2 * cp_size} equal chunks")
            lengths = (seq_len,) * batch
        else:
            if isinstance(cu_seqlens, torch.Tensor):
                cu_seqlens = cu_seqlens.tolist()  # once per batch, on the host
            lengths = _validated_lengths(cu_seqlens, total, cp_size)
        local = tuple(length // cp_size for length in lengths)
        cu_local = [0]
        for length in local:
            cu_local.append(cu_local[-1] + length)
        return cls(cp_size=cp_size, cp_rank=cp_rank, batch=batch, seq_len=seq_len,
                   packed=cu_seqlens is not None, seqlens=lengths, local_seqlens=local,
                   local_cu_seqlens=tuple(cu_local),
                   positions=zigzag_positions(lengths, cp_size, cp_rank))

    @property
    def local_seq_len(self) -> int:
        """Columns of a local `[b, s/cp]` tensor."""
        return self.seq_len // self.cp_size

    def index(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """`positions` as an int64 tensor (flat global index of every local flat row)."""
        return torch.tensor(self.positions, dtype=torch.int64, device=device)

    def global_rows_cols(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(row, column) in the global `[b, s]` batch of every local flat row, int64."""
        index = self.index()
        return index // self.seq_len, index % self.seq_len

    def shard(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's `[b, s/cp, ...]` part of a `[b, s, ...]` tensor.

        `index`: `self.index(x.device)` when the caller shards several tensors (built once).
        """
        self._check_shape(x, self.seq_len, "shard")
        if index is None:
            index = self.index(x.device)
        flat = x.reshape((self.batch * self.seq_len,) + tuple(x.shape[2:]))
        return flat.index_select(0, index).reshape(
            (self.batch, self.local_seq_len) + tuple(x.shape[2:]))

    def _check_shape(self, x: torch.Tensor, seq_len: int, what: str) -> None:
        if x.dim() < 2 or tuple(x.shape[:2]) != (self.batch, seq_len):
            raise ValueError(f"zigzag {what} expects a [{self.batch}, {seq_len}, ...] tensor, "
                             f"got shape {tuple(x.shape)}")


def zigzag_unshard(shards: Sequence[torch.Tensor], plans: Sequence[ZigzagShard]) -> torch.Tensor:
    """Reassemble the global `[b, s, ...]` tensor from every rank's shard (rank order)."""
    if len(shards) != len(plans) or not plans or len(plans) != plans[0].cp_size:
        raise ValueError(f"zigzag_unshard needs one shard and one plan per rank of the group, "
                         f"got {len(shards)} shards and {len(plans)} plans")
    first = plans[0]
    for plan, part in zip(plans, shards):
        plan._check_shape(part, first.local_seq_len, "unshard")
    tail = tuple(shards[0].shape[2:])
    flat_parts = [s.reshape((-1,) + tail) for s in shards]
    index = torch.cat([p.index(shards[0].device) for p in plans])
    out = flat_parts[0].new_empty((first.batch * first.seq_len,) + tail)
    out.index_copy_(0, index, torch.cat(flat_parts))
    return out.reshape((first.batch, first.seq_len) + tail)


def zigzag_gather(x: torch.Tensor, plan: ZigzagShard, group=None) -> torch.Tensor:
    """All-gather every rank's `[b, s/cp, ...]` shard over `group` into the global tensor.

    For tests and debugging; training never gathers activations.
    """
    parts = [torch.empty_like(x) for _ in range(plan.cp_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    plans = [ZigzagShard.build(plan.batch, plan.seq_len, plan.cp_size, r,
                               _cumulative(plan.seqlens) if plan.packed else None)
             for r in range(plan.cp_size)]
    return zigzag_unshard(parts, plans)


def _cumulative(lengths: Sequence[int]) -> Tuple[int, ...]:
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    return tuple(cu)
