"""Decode attention against a KV cache sharded over the context-parallel group.

Each CP rank keeps the keys/values of its own part of the sequence. A new query (the same on
every rank) attends to the local shard with the backend's attention-with-lse; the partial
outputs and log-sum-exps of all ranks are all-gathered and merged in fp32 (`merge_partial`,
the ring's merge), so every rank ends with the exact attention over the whole cache. One
all-gather of `[cp, rows, n_q, d + 1]` per layer and step: independent of the context length.

The query must come after every cached key (decode, or a chunk whose own keys are in the
cache: then the local block uses the `causal_bottom_right` mask on the rank that holds them);
the caller passes the AttentionParams of the LOCAL block (dense or packed, as any backend call).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from backends.attention_params import AttentionParams
from backends.base import Backend
from mindspeed_vita.parallel.ring_attention import merge_partial


def _lse_rows(lse: torch.Tensor, packed: bool) -> torch.Tensor:
    """lse laid out like the output without its head dim: [b,n,s] -> [b,s,n]; [n,t] -> [t,n]."""
    return lse.transpose(0, 1) if packed else lse.transpose(1, 2)


def cp_decode_attention(q: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor,
                        params: AttentionParams, backend: Backend,
                        cp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Attention of `q` over the union of every CP rank's `k_local` / `v_local`.

    Layouts follow the backend convention: dense `q [b, s_q, n_q, d]`, `k/v [b, s_kv, n_kv, d]`,
    or packed `[t, n, d]` with `params` holding the local cumulative lengths. A rank may hold
    no key at all for a row (its partial lse is -inf and drops out of the merge). Returns the
    output in q's dtype, identical on every rank of `cp_group` (up to fp32 rounding).
    """
    out, lse = backend.attention_forward(q, k_local, v_local, params)
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return out
    packed = params.is_packed
    # one collective: output and lse travel together as [..., n, d + 1] in fp32
    local = torch.cat([out.float(), _lse_rows(lse, packed).float().unsqueeze(-1)], dim=-1)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(cp_group))]
    dist.all_gather(gathered, local.contiguous(), group=cp_group)
    merged_out = merged_lse = None
    for part in gathered:
        part_out = part[..., :-1]
        part_lse = part[..., -1]
        part_lse = part_lse.transpose(0, 1) if packed else part_lse.transpose(1, 2)
        if merged_out is None:
            merged_out, merged_lse = part_out, part_lse
        else:
            merged_out, merged_lse = merge_partial(merged_out, merged_lse, part_out, part_lse,
                                                   packed)
    # a row no rank has a key for: every partial is 0 with lse -inf, the merge keeps 0
    return merged_out.to(q.dtype)
