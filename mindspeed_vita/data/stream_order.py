"""Continuing a data stream at another data-parallel size, without repeating or losing a sample.

Data-parallel rank r of dp_size D reads positions r, r + D, r + 2D, ... of one order, and packs
them itself. A checkpoint holds, per rank, how many of its positions it consumed and which of
those its packer still holds (read, not yet trained on). At the same D every rank simply
continues. At another D the old ranks' frontiers differ (rank 0 may be a position ahead of
rank 1) and their packers hold samples that were never trained on, so no stream position is
a correct restart point. `continue_order` builds the order the new ranks share instead:

    StreamOrder(carry=[positions the old ranks had not trained on, below their frontier, in
                       stream order: held samples and the gaps], frontier=first position no
                       old rank reached)

read as carry[0], carry[1], ..., then frontier, frontier + 1, ... . Every sample the old run
did not train on comes exactly once, every sample it trained on never again; samples it
rejected (bad data) stay skipped. Orders compose: a run resumed at a second dp size continues
the carried order the same way. The plain stream is `StreamOrder()` (carry empty, frontier 0),
and a pipeline on it is exactly the pipeline without an order (same fingerprint).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mindspeed_vita.data.mixture import MixtureStream, StreamItem, _PositionedItems


@dataclass(frozen=True)
class StreamOrder:
    """Positions of the stream in the order the dp shards divide: `carry`, then `frontier`
    onwards (see the module doc)."""

    carry: Tuple[int, ...] = ()
    frontier: int = 0

    @property
    def plain(self) -> bool:
        """True for the stream's own order (nothing carried, nothing skipped)."""
        return not self.carry and self.frontier == 0

    def positions(self, index: np.ndarray) -> np.ndarray:
        """Stream positions at indices `index` of this order."""
        index = np.asarray(index, dtype=np.int64)
        carry = np.asarray(self.carry, dtype=np.int64)
        tail = self.frontier + index - len(carry)
        if not len(carry):
            return tail
        return np.where(index < len(carry), carry[np.minimum(index, len(carry) - 1)], tail)

    def fingerprint(self) -> str:
        return hashlib.sha1(repr((self.carry, self.frontier)).encode()).hexdigest()[:12]

    def state_dict(self) -> Dict[str, Any]:
        return {"carry": list(self.carry), "frontier": self.frontier}

    @classmethod
    def from_state(cls, state: Optional[Dict[str, Any]]) -> "StreamOrder":
        """`state_dict()` back; None (a checkpoint from before orders existed) is the plain order."""
        if not state:
            return cls()
        return cls(tuple(int(p) for p in state["carry"]), int(state["frontier"]))


class OrderedStream:
    """`stream` read in `order`; shards like `MixtureStream.shard` (records are read with the
    stream's own `read`)."""

    def __init__(self, stream: MixtureStream, order: StreamOrder):
        self.stream = stream
        self.order = order

    def shard(self, dp_rank: int, dp_size: int) -> "OrderedShard":
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        return OrderedShard(self, offset=dp_rank, stride=dp_size)


class OrderedShard(_PositionedItems):
    """Every `stride`-th index of an `OrderedStream` from `offset`: shard position k is order
    index offset + k * stride."""

    def __init__(self, ordered: OrderedStream, *, offset: int, stride: int):
        self.ordered = ordered
        self.stream = ordered.stream
        self.offset = int(offset)
        self.stride = int(stride)

    def items(self, positions: np.ndarray) -> List[StreamItem]:
        positions = np.asarray(positions, dtype=np.int64)
        found = self.stream.items(self.ordered.order.positions(self.offset + positions * self.stride))
        return [item._replace(position=int(p)) for item, p in zip(found, positions)]

    def fingerprint(self) -> str:
        return (f"{self.stream.fingerprint()}/order-{self.ordered.order.fingerprint()}/"
                f"{self.offset}+{self.stride}k")


def order_of(pipeline) -> StreamOrder:
    """The order a `DataPipeline` reads (the plain order unless built on an `OrderedStream`)."""
    ordered = getattr(pipeline.shard, "ordered", None)
    return StreamOrder() if ordered is None else ordered.order


def held_positions(packer_state: Dict[str, Any]) -> List[int]:
    """Shard positions a saved packer state holds (finished unread rows, open row, window)."""
    return ([p for row in packer_state["ready"] for p in row] + list(packer_state["row"])
            + list(packer_state["window"]))


def continue_order(order: StreamOrder, states: Sequence[Dict[str, Any]]) -> StreamOrder:
    """The order for a new dp size, from `order` (the one the old run read) and the pipeline
    states (`DataPipeline.state_dict()`) of every old dp rank."""
    sizes = {int(s["dp_size"]) for s in states}
    ranks = sorted(int(s["dp_rank"]) for s in states)
    if len(sizes) != 1 or ranks != list(range(len(states))) or sizes != {len(states)}:
        raise ValueError(f"need the data states of every data-parallel rank once, got ranks "
                         f"{ranks} of sizes {sorted(sizes)}")
    dp_size = len(states)
    # first order index no old rank consumed
    frontier = max((int(s["dp_rank"]) + dp_size * (int(s["consumed"]) - 1) + 1
                    for s in states if int(s["consumed"])), default=0)
    # below it, not trained on: what the packers hold, and each rank's unconsumed tail (only
    # these few are enumerated: a long run's consumed range is never walked)
    pending = []
    for state in states:
        rank, consumed = int(state["dp_rank"]), int(state["consumed"])
        pending += [rank + dp_size * k for k in held_positions(state["packer"])]
        pending += range(rank + dp_size * consumed, frontier, dp_size)
    pending = np.array(sorted(pending), dtype=np.int64)
    carry = [int(p) for p in order.positions(pending)] + list(order.carry[frontier:])
    return StreamOrder(tuple(carry), order.frontier + max(0, frontier - len(order.carry)))
