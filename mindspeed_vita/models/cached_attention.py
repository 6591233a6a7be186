"""Core attention with a KV cache, chosen by the layer spec: one class per attention strategy.

megatron threads our per-forward `RotarySeqParams` through every layer; inference puts the KV
cache the model method was given (`LongVitaModel.prefill` / `decode_step`) in its `inference`
field. Without a cache these classes are exactly their parents (training, scoring, the
fixed-length decode mode). With one:

* `CachedCoreAttention` (one process, or TP only): store this step's rotated keys/values in the
  `KVCache`, attend to everything cached with the `causal_bottom_right` mask (the step's rows
  come after the cached ones; a prefill into an empty cache is plain causal);
* `CachedRingCoreAttention` (context parallelism): the prefill runs the zigzag ring attention
  and each rank keeps the keys of its own slices in its `ShardedKVCache`; a decode step's query
  (the same on every rank) attends to the local shard and the partial results of every rank are
  merged exactly by log-sum-exp (`parallel.cp_decode.cp_decode_attention`).

The cache type must match the strategy (a `ShardedKVCache` for the ring, a plain one otherwise),
so a cache built for another layout is refused instead of silently attending to a part.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from backends.attention_params import AttentionParams
from mindspeed_vita.inference.kv_cache import KVCache, ShardedKVCache
from mindspeed_vita.models.core_attention import BackendCoreAttention
from mindspeed_vita.models.ring_core_attention import RingCoreAttention
from mindspeed_vita.parallel.cp_decode import cp_decode_attention
from mindspeed_vita.parallel.ring_attention import ring_attention

#: the step's rows after every cached key (decode against a cache, a chunk after a prefix)
_BOTTOM_RIGHT = AttentionParams.dense("causal_bottom_right")


def _dense_only(p, name: str) -> None:
    if p.qkv_format != "sbhd":
        raise ValueError(f"{name}: KV-cache inference takes dense [b, s] requests "
                         f"(got qkv_format={p.qkv_format!r}); packed batches are for training")


def _to_megatron(out: torch.Tensor) -> torch.Tensor:
    """Backend `[b, s, n, d]` -> megatron `[s, b, n * d]`."""
    out = out.transpose(0, 1)
    return out.reshape(out.shape[0], out.shape[1], -1)


class CachedCoreAttention(BackendCoreAttention):
    """`BackendCoreAttention` that reads and extends a `KVCache` when the forward carries one."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """As `BackendCoreAttention.forward`; with a cache, q `[s_new, b, n_q, d]` attends to
        every cached key plus the step's own (causal among the step's rows)."""
        p = self._checked(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        cache = p.inference
        if cache is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        name = type(self).__name__
        if not isinstance(cache, KVCache) or isinstance(cache, ShardedKVCache):
            raise ValueError(f"{name} needs a KVCache of one process, got {type(cache).__name__} "
                             f"(a ShardedKVCache belongs to a context-parallel model)")
        _dense_only(p, name)
        query = self.backend.apply_rotary(query, p.rotary_cos, p.rotary_sin)
        key = self.backend.apply_rotary(key, p.rotary_cos, p.rotary_sin)
        key, value = cache.update(self.layer_number, key, value)
        out = self.backend.attention(query.transpose(0, 1), key.transpose(0, 1),
                                     value.transpose(0, 1), self._with_scale(_BOTTOM_RIGHT))
        return _to_megatron(out)


class CachedRingCoreAttention(RingCoreAttention):
    """`RingCoreAttention` that fills a `ShardedKVCache` at prefill and decodes against it."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """As `RingCoreAttention.forward`; with a cache: the prefill (this rank's zigzag shard
        `[s_local, b, n, d]`) also stores the shard's keys; a decode step (`[1, b, n, d]`, the
        same on every rank) attends to the keys of every rank."""
        p = self._checked(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        cache = p.inference
        if cache is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        name = type(self).__name__
        if not isinstance(cache, ShardedKVCache):
            raise ValueError(f"{name} needs a ShardedKVCache (context-parallel decoding), got "
                             f"{type(cache).__name__}")
        _dense_only(p, name)
        query = self.backend.apply_rotary(query, p.rotary_cos, p.rotary_sin)
        key = self.backend.apply_rotary(key, p.rotary_cos, p.rotary_sin)
        key_all, value_all = cache.update(self.layer_number, key, value)
        q = query.transpose(0, 1)
        if cache.is_prefill:
            out = self._ring(q, key.transpose(0, 1), value.transpose(0, 1), p.attention)
        else:
            out = cp_decode_attention(q, key_all.transpose(0, 1), value_all.transpose(0, 1),
                                      self._with_scale(_BOTTOM_RIGHT), self.backend,
                                      cache.cp_group)
        return _to_megatron(out)

    def _ring(self, q, k, v, attention) -> torch.Tensor:
        return ring_attention(q, k, v, self._ring_params(attention), self.backend, self.ring)
