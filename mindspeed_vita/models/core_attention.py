"""Core attention for megatron's SelfAttention that runs rotary and attention on a `Backend`.

megatron's `SelfAttention` projects q/k/v (fused, GQA-interleaved `linear_qkv`), calls its
`core_attention` submodule, then projects out. We plug `BackendCoreAttention` in as that
submodule. It receives q/k/v in megatron's layout - `[s, b, n, d]`, or `[t, n, d]` when the
batch is packed (THD) - applies RoPE with `backend.apply_rotary` and attends with
`backend.attention` (causal, GQA, per-sequence bounds when packed, all in one `AttentionParams`
built once per forward).

Why rotary lives here and not in megatron: megatron's own RoPE derives angles from `arange`
(per packed sequence at best) and has its own CP slicing; our batches carry explicit position
ids (reset-mode packing restarts them, CP zigzag shards them). So the model computes cos/sin from
the batch's position ids once per forward and hands them down in `RotarySeqParams`, a
`PackedSeqParams` that megatron already threads untouched from `TransformerBlock` through every
layer (and through activation recompute) to this module. megatron is given
`rotary_pos_emb=None`, so RoPE is applied exactly once, here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from backends.attention_params import AttentionParams
from backends.base import Backend


@dataclass
class RotarySeqParams(PackedSeqParams):
    """megatron's `PackedSeqParams` plus the rotary cos/sin of this batch's positions.

    `qkv_format="sbhd"`: dense batch, `rotary_cos`/`rotary_sin` are `[s, b, 1, d]`.
    `qkv_format="thd"`: packed batch, `cu_seqlens_q/kv` (int32, leading 0) bound the sequences
    and `rotary_cos`/`rotary_sin` are `[t, 1, d]`; `attention` holds the same bounds as the
    backend's `AttentionParams` (device tensors AND host tuples), built once per forward so no
    layer's attention call syncs the device.
    Under context parallelism `attention` is the batch's `RingAttentionParams` instead (dense or
    packed), which the layer spec's `RingCoreAttention` takes.
    """

    attention: Optional[Any] = None
    rotary_cos: Optional[torch.Tensor] = None
    rotary_sin: Optional[torch.Tensor] = None
    #: inference only: the KV cache the model's `prefill` / `decode_step` were given
    #: (`inference.kv_cache.KVCache`, or its `ShardedKVCache` under CP), threaded to every
    #: layer; the layer spec's cached core attention (`models.cached_attention`) stores this
    #: step's keys there and attends to what is cached. None: an ordinary forward.
    inference: Optional[Any] = None


#: dense causal self-attention; the params hold no tensors, so one object serves every call
_DENSE_CAUSAL = AttentionParams.dense("causal")


def packed_attention_params(cu_seqlens: Sequence[int], device) -> AttentionParams:
    """Causal `AttentionParams` of a packed batch from HOST cumulative lengths (leading 0).

    `cu_seqlens`: a list/tuple or a CPU tensor (PackedBatch's; `.tolist()` on a host tensor is
    no device sync). The device tensors are built once here, for every layer to share.
    """
    return AttentionParams.packed(cu_seqlens, mask="causal", device=device)


def attention_params_of(packed_seq_params: PackedSeqParams, device) -> AttentionParams:
    """The `AttentionParams` a THD `PackedSeqParams` describes: its own `attention` when it is a
    `RotarySeqParams` that has one, else built once from `cu_seqlens_q/kv` (read to the host:
    one sync per forward when they live on the device, none per layer)."""
    attention = getattr(packed_seq_params, "attention", None)
    if attention is not None:
        return attention
    p = packed_seq_params
    if p.cu_seqlens_q is None:
        raise ValueError("packed (thd) PackedSeqParams need cu_seqlens_q")
    cu_q = p.cu_seqlens_q.cpu()
    same = p.cu_seqlens_kv is None or p.cu_seqlens_kv is p.cu_seqlens_q
    cu_kv = None if same else p.cu_seqlens_kv.cpu()
    return AttentionParams.packed(cu_q, cu_kv, mask="causal", device=device)


class BackendCoreAttention(MegatronModule):
    """Causal (GQA) self-attention core computed by `backend`, RoPE included.

    Built by megatron's `SelfAttention` from the layer spec
    (`ModuleSpec(BackendCoreAttention, params={"backend": backend})`), with the same keyword
    arguments as megatron's `DotProductAttention`. Has no parameters.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, *, backend: Backend):
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"BackendCoreAttention implements self-attention only, "
                             f"got attention_type={attention_type!r}")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"BackendCoreAttention is causal-only, got {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: backend attention kernels have no "
                             f"dropout (Qwen2 trains with 0.0)")
        self.backend = backend
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale

    def _with_scale(self, params: AttentionParams) -> AttentionParams:
        """`params` with this layer's softmax scale when megatron gave one."""
        if self.softmax_scale is None or params.scale == self.softmax_scale:
            return params
        return dataclasses.replace(params, scale=self.softmax_scale)

    def _checked(self, attention_mask, attn_mask_type, attention_bias,
                 packed_seq_params) -> RotarySeqParams:
        """Refuse what megatron may pass that this causal, mask-free core cannot honour; return
        the `RotarySeqParams` (rotary cos/sin and attention parameters of the batch)."""
        name = type(self).__name__
        if attention_mask is not None or attention_bias is not None:
            raise ValueError(f"{name} takes no attention_mask / attention_bias: "
                             "causality is built in and packed sequences use cu_seqlens")
        if attn_mask_type is not None and attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"{name} is causal-only, got {attn_mask_type}")
        p = packed_seq_params
        if not isinstance(p, RotarySeqParams) or p.rotary_cos is None:
            raise ValueError(f"{name} needs RotarySeqParams with rotary cos/sin "
                             "(built by Qwen2LanguageModel.forward from position_ids)")
        return p

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """q `[s, b, n_q, d]`, k/v `[s, b, n_kv, d]` -> `[s, b, n_q * d]`; packed (THD):
        q `[t, n_q, d]`, k/v `[t, n_kv, d]` -> `[t, n_q * d]`."""
        p = self._checked(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        query = self.backend.apply_rotary(query, p.rotary_cos, p.rotary_sin)
        key = self.backend.apply_rotary(key, p.rotary_cos, p.rotary_sin)
        if p.qkv_format == "thd":
            if p.attention is None:
                raise ValueError("packed (thd) attention needs RotarySeqParams.attention, built "
                                 "once per forward by Qwen2LanguageModel.rotary_params")
            out = self.backend.attention(query, key, value, self._with_scale(p.attention))
            return out.reshape(out.shape[0], -1)
        if p.qkv_format != "sbhd":
            raise ValueError(f"qkv_format={p.qkv_format!r}: expected 'sbhd' or 'thd'")
        # megatron is [s, b, n, d]; backends take [b, s, n, d]
        out = self.backend.attention(query.transpose(0, 1), key.transpose(0, 1),
                                     value.transpose(0, 1), self._with_scale(_DENSE_CAUSAL))
        out = out.transpose(0, 1)
        return out.reshape(out.shape[0], out.shape[1], -1)
