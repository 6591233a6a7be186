"""Causal ring attention over zigzag shards, built on the backend's attention-with-lse.

Each rank of the context-parallel group holds the zigzag shard of q, k and v (chunks r and
2P-1-r of every sequence, see `parallel.zigzag`). The key/value blocks travel around the ring;
at step i rank r holds the block of rank src = r - i (mod P) and computes one half-sized block:

* step 0 (its own kv): causal attention of the local q over the local kv;
* src < r (an earlier rank's kv): all local q against the FIRST half of that kv, no mask;
* src > r (a later rank's kv): the SECOND half of local q against all of that kv, no mask,
  merged into the second half of the output only.

The zigzag makes these the only cases and all of them the same size, so every rank does equal
work at every step. Partial results merge in fp32 by log-sum-exp. The backward recomputes each
block's gradients under the FINAL merged output and lse (which makes each block's share exact),
accumulates dq locally in fp32 and sends the fp32 dk/dv of every block around the ring one hop
behind the kv, so it ends on the rank that owns that block. The next block's send/recv is posted
before the current block is computed, so communication overlaps computation.

Layouts follow `backends.base`: dense `[b, s, n, d]` (joint mode, each row one sequence) or
packed `[t, n, d]` with per-sample cumulative lengths (reset mode). In packed input the "halves"
are the halves of every sample's local part (its two zigzag chunks), gathered by index tensors
built once per batch in `RingAttentionParams`. GQA (fewer kv heads) is handled by the backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from backends.attention_params import AttentionParams, lengths_from_cu
from mindspeed_vita.parallel.zigzag import ZigzagShard

# gloo matches messages by (peer, tag): kv and dk/dv can be in flight together between the
# same two ranks, so they use different tags (NCCL/HCCL ignore tags and keep posting order)
_KV_TAG, _GRAD_TAG = 11, 12


@dataclass(frozen=True)
class RingGroup:
    """The context-parallel group as the ring sees it: the process group, its members' global
    ranks in group order, and this process's index among them."""

    group: Optional[dist.ProcessGroup]
    ranks: Tuple[int, ...]
    rank: int

    @classmethod
    def of(cls, group: Optional[dist.ProcessGroup],
           ranks: Optional[Sequence[int]] = None) -> "RingGroup":
        """From a process group (None: the default group) and, optionally, its global ranks."""
        if ranks is None:
            ranks = (dist.get_process_group_ranks(group) if group is not None
                     else range(dist.get_world_size()))
        ranks = tuple(int(r) for r in ranks)
        me = dist.get_rank()
        if me not in ranks:
            raise ValueError(f"rank {me} is not a member of the context-parallel group {ranks}")
        return cls(group=group, ranks=ranks, rank=ranks.index(me))

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def next_peer(self) -> int:
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev_peer(self) -> int:
        return self.ranks[(self.rank - 1) % self.size]


class _Exchange:
    """Send tensors to the next rank and receive same-shaped ones from the previous rank,
    asynchronously; `wait()` returns the received tensors once every transfer is done."""

    def __init__(self, ring: RingGroup, tensors: Sequence[torch.Tensor], tag: int) -> None:
        sends = [t.contiguous() for t in tensors]
        self._received = [torch.empty_like(t) for t in sends]
        ops = [dist.P2POp(dist.isend, t, ring.next_peer, ring.group, tag) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, ring.prev_peer, ring.group, tag)
                for t in self._received]
        self._sends = sends  # kept alive until the transfers complete
        self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> List[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._sends = None
        return self._received


@dataclass(frozen=True, eq=False)
class RingAttentionParams:
    """Per-batch, host-built parameters of the three kinds of ring step (see module doc).

    Attributes:
        diagonal: local q vs local kv, causal (per sample when packed).
        earlier: local q vs the first half of an earlier rank's kv, no mask.
        later: the second half of local q vs all of a later rank's kv, no mask.
        first_half, second_half: packed only: int64 token indices (on the compute device) of
            the first / second half of every sample's local part; None for dense input.
    """

    diagonal: AttentionParams
    earlier: AttentionParams
    later: AttentionParams
    first_half: Optional[torch.Tensor] = None
    second_half: Optional[torch.Tensor] = None

    @property
    def is_packed(self) -> bool:
        return self.first_half is not None

    @classmethod
    def dense(cls, scale: Optional[float] = None) -> "RingAttentionParams":
        """For dense `[b, s_local, n, d]` shards (joint mode: each row one sequence)."""
        return cls(diagonal=AttentionParams.dense("causal", scale),
                   earlier=AttentionParams.dense("none", scale),
                   later=AttentionParams.dense("none", scale))

    @classmethod
    def packed(cls, local_cu_seqlens: Sequence[int], *, scale: Optional[float] = None,
               device=None) -> "RingAttentionParams":
        """For packed `[t_local, n, d]` shards with HOST cumulative local lengths (leading 0),
        e.g. `ZigzagShard.local_cu_seqlens`. Every local length must be even (two chunks)."""
        cu = tuple(int(x) for x in local_cu_seqlens)
        lengths = lengths_from_cu(cu)
        odd = [i for i, n in enumerate(lengths) if n % 2]
        if odd:
            raise ValueError(f"local sample {odd[0]} has {lengths[odd[0]]} tokens: a zigzag "
                             "shard holds two equal chunks of every sample, so its length is even")
        halves = [0]
        first, second = [], []
        for start, n in zip(cu, lengths):
            half = n // 2
            halves.append(halves[-1] + half)
            first.extend(range(start, start + half))
            second.extend(range(start + half, start + n))
        return cls(
            diagonal=AttentionParams.packed(cu, mask="causal", scale=scale, device=device),
            earlier=AttentionParams.packed(cu, halves, mask="none", scale=scale, device=device),
            later=AttentionParams.packed(halves, cu, mask="none", scale=scale, device=device),
            first_half=torch.tensor(first, dtype=torch.int64, device=device),
            second_half=torch.tensor(second, dtype=torch.int64, device=device))

    @classmethod
    def from_shard(cls, shard: ZigzagShard, *, packed: Optional[bool] = None,
                   scale: Optional[float] = None, device=None) -> "RingAttentionParams":
        """For the layout of a zigzag shard: packed (THD over `local_cu_seqlens`) in reset mode,
        dense in joint mode, unless `packed` says otherwise (joint rows can run as THD too)."""
        if shard.packed if packed is None else packed:
            return cls.packed(shard.local_cu_seqlens, scale=scale, device=device)
        return cls.dense(scale)

    # -------------------------------------------------------- half selection
    def first(self, x: torch.Tensor) -> torch.Tensor:
        """First half of every sequence of a `[b, s, ...]` (dense) / `[t, ...]` (packed) x."""
        if self.is_packed:
            return x.index_select(0, self.first_half)
        return x[:, : x.shape[1] // 2].contiguous()

    def second(self, x: torch.Tensor) -> torch.Tensor:
        """Second half of every sequence of x (layouts as in `first`)."""
        if self.is_packed:
            return x.index_select(0, self.second_half)
        return x[:, x.shape[1] // 2:].contiguous()

    def second_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """Second-half rows of an lse (`[b, n, s]` dense, `[n, t]` packed)."""
        if self.is_packed:
            return lse.index_select(1, self.second_half)
        return lse[:, :, lse.shape[2] // 2:].contiguous()

    def add_first_(self, acc: torch.Tensor, x: torch.Tensor) -> None:
        """acc[first halves] += x (x in acc's dtype)."""
        if self.is_packed:
            acc.index_add_(0, self.first_half, x)
        else:
            acc[:, : acc.shape[1] // 2] += x

    def add_second_(self, acc: torch.Tensor, x: torch.Tensor) -> None:
        """acc[second halves] += x."""
        if self.is_packed:
            acc.index_add_(0, self.second_half, x)
        else:
            acc[:, acc.shape[1] // 2:] += x


def _lse_as_out(lse: torch.Tensor, packed: bool) -> torch.Tensor:
    """lse laid out to broadcast against the output: [b,n,s] -> [b,s,n,1]; [n,t] -> [t,n,1]."""
    return (lse.transpose(0, 1) if packed else lse.transpose(1, 2)).unsqueeze(-1)


def merge_partial(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                  block_lse: torch.Tensor, packed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint key sets, in fp32 (reference sheet, sec. 1).

    L = log(exp(L1) + exp(L2)); O = O1 - sigmoid(L2 - L1) * (O1 - O2). Rows that see no key
    in either part (both lse -inf) stay output 0, lse -inf.
    """
    out, block_out = out.float(), block_out.float()
    lse, block_lse = lse.float(), block_lse.float()
    weight = torch.sigmoid(block_lse - lse).nan_to_num(nan=0.0)  # nan only when both are -inf
    merged = out - _lse_as_out(weight, packed) * (out - block_out)
    return merged, torch.logaddexp(lse, block_lse)


def _source_rank(ring: RingGroup, step: int) -> int:
    return (ring.rank - step) % ring.size


def ring_forward(q, k, v, params: RingAttentionParams, backend, ring: RingGroup, *,
                 communicate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, fp32 lse) of causal attention over the whole zigzag-sharded sequence.

    `communicate=False` runs the same schedule on this rank's own kv without any transfer
    (only for measuring compute alone in `bench ring`; the result is not attention).
    """
    packed = params.is_packed
    out = lse = None
    kv = (k, v)
    for step in range(ring.size):
        src = _source_rank(ring, step)
        exchange = (_Exchange(ring, kv, _KV_TAG)
                    if communicate and step + 1 < ring.size else None)
        if step == 0:
            block_out, block_lse = backend.attention_forward(q, k, v, params.diagonal)
            out, lse = block_out.float(), block_lse.float()
        elif src < ring.rank:
            block_out, block_lse = backend.attention_forward(
                q, params.first(kv[0]), params.first(kv[1]), params.earlier)
            out, lse = merge_partial(out, lse, block_out, block_lse, packed)
        else:
            block_out, block_lse = backend.attention_forward(
                params.second(q), kv[0], kv[1], params.later)
            half_out, half_lse = merge_partial(params.second(out), params.second_lse(lse),
                                               block_out, block_lse, packed)
            out, lse = _put_second(params, out, lse, half_out, half_lse)
        if exchange is not None:
            kv = tuple(exchange.wait())
    return out.to(q.dtype), lse


def _put_second(params: RingAttentionParams, out, lse, half_out, half_lse):
    """out/lse with their second-half rows replaced (in place: they are our fp32 buffers)."""
    if params.is_packed:
        out.index_copy_(0, params.second_half, half_out)
        lse.index_copy_(1, params.second_half, half_lse)
    else:
        out[:, out.shape[1] // 2:] = half_out
        lse[:, :, lse.shape[2] // 2:] = half_lse
    return out, lse


def ring_backward(dout, q, k, v, out, lse, params: RingAttentionParams, backend,
                  ring: RingGroup, *, communicate: bool = True):
    """(dq, dk, dv) of `ring_forward` given its final out and lse; dk/dv of this rank's kv."""
    dout = dout.contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = (k, v)
    grads_in_flight = None
    dk = dv = None
    for step in range(ring.size):
        src = _source_rank(ring, step)
        exchange = (_Exchange(ring, kv, _KV_TAG)
                    if communicate and step + 1 < ring.size else None)
        if step == 0:
            dq_b, dk_b, dv_b = backend.attention_backward(dout, q, k, v, out, lse,
                                                          params.diagonal)
            dq += dq_b
            dk, dv = dk_b.float(), dv_b.float()
        elif src < ring.rank:
            dq_b, dk_b, dv_b = backend.attention_backward(
                dout, q, params.first(kv[0]), params.first(kv[1]), out, lse, params.earlier)
            dq += dq_b
            dk, dv = grads_in_flight.wait() if communicate else _zeros_like_f32(kv)
            params.add_first_(dk, dk_b.float())
            params.add_first_(dv, dv_b.float())
        else:
            dq_b, dk_b, dv_b = backend.attention_backward(
                params.second(dout), params.second(q), kv[0], kv[1], params.second(out),
                params.second_lse(lse), params.later)
            params.add_second_(dq, dq_b.float())
            dk, dv = grads_in_flight.wait() if communicate else _zeros_like_f32(kv)
            dk += dk_b.float()
            dv += dv_b.float()
        if communicate and ring.size > 1:
            # this block's gradients so far go one hop on, after the kv they belong to; after
            # the last step that hop brings every block's gradients home
            grads_in_flight = _Exchange(ring, (dk, dv), _GRAD_TAG)
        if exchange is not None:
            kv = tuple(exchange.wait())
    if grads_in_flight is not None:
        dk, dv = grads_in_flight.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _zeros_like_f32(tensors):
    return [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in tensors]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, params, backend, ring):
        out, lse = ring_forward(q, k, v, params, backend, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params, ctx.backend, ctx.ring = params, backend, ring
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.params, ctx.backend, ctx.ring)
        return dq, dk, dv, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   ring_params: RingAttentionParams, backend, cp_group) -> torch.Tensor:
    """Differentiable causal attention of this rank's zigzag shard over the whole sequence.

    q `[b, s_local, n_q, d]` / k, v `[b, s_local, n_kv, d]` with `RingAttentionParams.dense`,
    or `[t_local, n, d]` with `RingAttentionParams.packed`. `cp_group`: a `RingGroup`, or the
    context-parallel `torch.distributed` process group (its ranks are looked up once here).
    Returns the output in q's dtype and layout.
    """
    ring = cp_group if isinstance(cp_group, RingGroup) else RingGroup.of(cp_group)
    return _RingAttention.apply(q, k, v, ring_params, backend, ring)
