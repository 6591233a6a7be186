"""megatron `ModuleSpec` of a Qwen2 decoder layer whose kernels come from a `Backend`.

The layer is megatron's own `TransformerLayer` / `SelfAttention` / `MLP` with its TE-free tensor
parallel linears (`ColumnParallelLinear` for qkv and fc1, `RowParallelLinear` for proj and fc2);
only the kernels are ours:

* norms: `BackendRMSNorm` -> `backend.rms_norm` (fp32 statistics, cast, times weight),
* core attention: `BackendCoreAttention` -> `backend.apply_rotary` + `backend.attention`, or
  under context parallelism (a CP group of more than one rank) `RingCoreAttention` ->
  `backend.apply_rotary` + zigzag ring attention over that group; the choice is made here, once,
  so no attention module branches on the CP size (the spec builds their KV-cache subclasses
  from `models.cached_attention`, which inference drives),
* MLP activation: `BackendSwiGLU` -> `backend.swiglu` on megatron's gated fc1 output, whose
  per-rank layout is `[gate; up]`.

The backend reaches every module through `ModuleSpec.params` (megatron passes spec params as
keyword arguments to the constructor), so there is no global registry: two models with two
backends can coexist. Qwen2 specifics (qkv bias only, RMSNorm eps, GQA) are `TransformerConfig`
fields set by `Qwen2LanguageModel`; the MLP activation hook is megatron's
`use_te_activation_func=True`, which despite its name only means "the activation is the spec's
`activation_func` module" - no Transformer Engine is involved.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from backends.base import Backend
from mindspeed_vita.models.cached_attention import CachedCoreAttention, CachedRingCoreAttention


class BackendRMSNorm(MegatronModule):
    """RMSNorm over the last dim computed by `backend.rms_norm` (Qwen2 semantics).

    A `MegatronModule`, so distributed checkpointing saves its weight as a replicated tensor."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, *,
                 backend: Backend):
        super().__init__(config=config)
        self.backend = backend
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallel each tp rank sees a slice of the sequence, so this weight's
        # gradient is partial; megatron's finalize_model_grads all-reduces params marked so.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., h]` -> `[..., h]`."""
        return self.backend.rms_norm(x, self.weight, self.eps)


class BackendSwiGLU(MegatronModule):
    """`silu(gate) * up` of megatron's gated fc1 output `[..., 2 * ffn / tp]` by the backend.

    A `MegatronModule` because megatron's `MLP.sharded_state_dict` asks every child for one."""

    def __init__(self, config: TransformerConfig, *, backend: Backend):
        super().__init__(config=config)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., 2f]` (`[gate; up]`) -> `[..., f]`."""
        return self.backend.swiglu(x)


def core_attention_spec(backend: Backend, cp_group=None) -> ModuleSpec:
    """The core attention of a layer: the backend's local attention, or ring attention over
    `cp_group` (the context-parallel process group) when that group has more than one rank.

    Both are the KV-cache-capable subclasses (`models.cached_attention`): identical to the
    plain classes in training, and the strategy a cached inference forward needs (a local
    cache, or a cache sharded over the CP group) when the forward carries one."""
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        return ModuleSpec(module=CachedRingCoreAttention,
                          params={"backend": backend, "cp_group": cp_group})
    return ModuleSpec(module=CachedCoreAttention, params={"backend": backend})


def qwen2_layer_spec(backend: Backend, cp_group=None) -> ModuleSpec:
    """One Qwen2 decoder layer: pre-norm causal GQA self-attention (ring attention over
    `cp_group` under context parallelism) and pre-norm SwiGLU MLP."""
    norm = ModuleSpec(module=BackendRMSNorm, params={"backend": backend})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention_spec(backend, cp_group),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear,
                    activation_func=ModuleSpec(module=BackendSwiGLU, params={"backend": backend}),
                    linear_fc2=RowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def qwen2_block_spec(backend: Backend, num_layers: int,
                     cp_group=None) -> TransformerBlockSubmodules:
    """`num_layers` Qwen2 layers followed by the final RMSNorm, for megatron's TransformerBlock;
    `cp_group`: the context-parallel group (`ParallelGroups.cp`), None at CP 1."""
    return TransformerBlockSubmodules(
        layer_specs=[qwen2_layer_spec(backend, cp_group)] * num_layers,
        layer_norm=ModuleSpec(module=BackendRMSNorm, params={"backend": backend}),
    )
