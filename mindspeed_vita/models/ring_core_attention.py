"""Core attention for context parallelism: RoPE, then zigzag ring attention over the CP group.

The layer spec selects `RingCoreAttention` instead of `BackendCoreAttention` when the context
parallel size is above 1 (`models.layer_spec.qwen2_layer_spec(..., cp_group=...)`), so neither
module branches on the CP size. It receives this rank's zigzag shard of q/k/v in megatron's
layout (`[s_local, b, n, d]`, or `[t_local, n, d]` for a packed reset-mode batch), rotates q/k
with the shard's own position ids (the rotary cos/sin in `RotarySeqParams` are those of the
shard, so RoPE needs nothing CP-specific), and runs `parallel.ring_attention.ring_attention`
with the `RingAttentionParams` that `models.inputs.build_model_inputs` built once per batch
(carried to every layer in `RotarySeqParams.attention`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from backends.base import Backend
from mindspeed_vita.models.core_attention import BackendCoreAttention
from mindspeed_vita.parallel.ring_attention import RingAttentionParams, RingGroup, ring_attention


class RingCoreAttention(BackendCoreAttention):
    """Causal (GQA) self-attention of a zigzag shard against the whole sequence, RoPE included.

    Built by megatron's `SelfAttention` from the layer spec
    (`ModuleSpec(RingCoreAttention, params={"backend": backend, "cp_group": group})`).
    `cp_group`: the context-parallel process group (`ParallelGroups.cp`).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, *, backend: Backend, cp_group):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection, backend=backend)
        self.ring = RingGroup.of(cp_group)

    def _ring_params(self, params) -> RingAttentionParams:
        if not isinstance(params, RingAttentionParams):
            raise ValueError("RingCoreAttention needs the batch's RingAttentionParams in "
                             "RotarySeqParams.attention (build the inputs with "
                             "models.inputs.build_model_inputs under the same ParallelGroups)")
        if self.softmax_scale is None:
            return params
        return dataclasses.replace(
            params, **{step: dataclasses.replace(getattr(params, step), scale=self.softmax_scale)
                       for step in ("diagonal", "earlier", "later")})

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """q `[s, b, n_q, d]`, k/v `[s, b, n_kv, d]` -> `[s, b, n_q * d]`; packed (THD):
        q `[t, n_q, d]`, k/v `[t, n_kv, d]` -> `[t, n_q * d]` (local shards in and out)."""
        p = self._checked(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        params = self._ring_params(p.attention)
        query = self.backend.apply_rotary(query, p.rotary_cos, p.rotary_sin)
        key = self.backend.apply_rotary(key, p.rotary_cos, p.rotary_sin)
        if p.qkv_format == "thd":
            out = ring_attention(query, key, value, params, self.backend, self.ring)
            return out.reshape(out.shape[0], -1)
        # megatron is [s, b, n, d]; the ring (like the backends) takes [b, s, n, d]
        out = ring_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                             params, self.backend, self.ring).transpose(0, 1)
        return out.reshape(out.shape[0], out.shape[1], -1)
