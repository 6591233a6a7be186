"""Qwen2 decoder on megatron-core: vocab-parallel embedding, decoder layers, final norm.

`Qwen2LanguageModel` is architecture only: the LM heads (full / chunked / logits-masked) and the
composed VLM sit on top of it and call `embed`, `forward` and `output_layer` / `logits`.
Shapes follow megatron: hidden states are `[s, b, h]`, and under sequence parallel each tp rank
holds `[s / tp, b, h]` between the layers.

Parameter names (the native checkpoint format, see `convert.qwen2_weights`) are megatron
GPTModel's: `embedding.word_embeddings.weight`, `decoder.layers.{i}.input_layernorm.weight`,
`...self_attention.linear_qkv.{weight,bias}`, `...self_attention.linear_proj.weight`,
`...pre_mlp_layernorm.weight`, `...mlp.linear_fc1.weight`, `...mlp.linear_fc2.weight`,
`decoder.final_layernorm.weight`, `output_layer.weight`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from backends.base import Backend
from mindspeed_vita.config.model import LanguageConfig
from mindspeed_vita.models.core_attention import RotarySeqParams, attention_params_of
from mindspeed_vita.models.layer_spec import qwen2_block_spec
from mindspeed_vita.models.rope import rotary_cos_sin
from mindspeed_vita.parallel.groups import ParallelGroups
from mindspeed_vita.parallel.layout import ParallelLayout


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Smallest multiple of `make_vocab_size_divisible_by * tp` that holds `vocab_size`
    (megatron's convention: every tp rank gets an equal, aligned vocabulary slice)."""
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def qwen2_transformer_config(cfg: LanguageConfig, dtype: torch.dtype, *, layout: ParallelLayout,
                             recompute: bool) -> TransformerConfig:
    """megatron TransformerConfig for a Qwen2 decoder (no dropout, no fusions needing CUDA)
    split as `layout` says (its constructor and `check_language` hold the parallel rules)."""
    layout.check_language(cfg)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,  # o_proj and MLP have no bias
        add_qkv_bias=cfg.qkv_bias,
        gated_linear_unit=True,  # fc1 = [gate; up]
        activation_func=F.silu,
        use_te_activation_func=True,  # activation = the spec's BackendSwiGLU module
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=layout.tp,
        sequence_parallel=layout.sequence_parallel,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


class Qwen2LanguageModel(MegatronModule):
    """Qwen2 decoder (embedding -> layers -> final RMSNorm) with a vocab-parallel output layer.

    `groups` (from `parallel.process_groups.initialize_parallel`) gives the tensor-parallel
    split and sequence parallelism (`groups.layout`, which refuses pipeline parallelism);
    megatron's layers inside read the same groups from its parallel state. `recompute=True`
    checkpoints every layer (megatron full/uniform, 1 layer per chunk), as Long-VITA stages 3-4
    do. Being a `MegatronModule`, it has megatron's `sharded_state_dict()` for distributed
    checkpointing and a `.config` for megatron's DDP.
    """

    def __init__(self, cfg: LanguageConfig, backend: Backend, dtype: torch.dtype = torch.bfloat16,
                 *, groups: ParallelGroups, recompute: bool = False):
        super().__init__(config=qwen2_transformer_config(cfg, dtype, layout=groups.layout,
                                                         recompute=recompute))
        self.cfg = cfg
        self.backend = backend
        self.groups = groups
        self.sequence_parallel = groups.sequence_parallel
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                                                   groups.tp_size)
        self.embedding = LanguageModelEmbedding(
            config=self.config, vocab_size=self.padded_vocab_size,
            max_sequence_length=cfg.max_position_embeddings, position_embedding_type="none")
        self.decoder = TransformerBlock(config=self.config,
                                        spec=qwen2_block_spec(
                                            backend, cfg.num_layers,
                                            cp_group=groups.cp if groups.cp_size > 1 else None))
        self.output_layer = ColumnParallelLinear(
            cfg.hidden_size, self.padded_vocab_size, config=self.config,
            init_method=self.config.init_method, bias=False, skip_bias_add=False,
            gather_output=False, skip_weight_param_allocation=cfg.tie_word_embeddings)
        # megatron allocates its linears on the current device; our norms are built on the host
        self.to(backend.device())

    # ------------------------------------------------------------------ pieces
    @property
    def output_weight(self) -> torch.Tensor:
        """This rank's vocabulary slice of the output projection `[V_pad / tp, h]` (the input
        embedding when `tie_word_embeddings`)."""
        if self.cfg.tie_word_embeddings:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[b, s]` -> embeddings `[s, b, h]`, or this rank's `[s / tp, b, h]` slice
        under sequence parallel (fused reduce-scatter, as megatron does)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
        return self.embedding(input_ids, position_ids=None)

    def rotary_params(self, position_ids: torch.Tensor, attention=None, *, inference=None,
                      rope_seq_len: Optional[int] = None) -> RotarySeqParams:
        """The per-batch attention inputs every layer gets: cos/sin of `position_ids [b, s]` in
        megatron's layout and the attention parameters (`attention`, see `forward`); packed
        parameters (`attention.is_packed`) select megatron's THD layout. `inference`: the KV
        cache of a cached inference forward (see `forward`)."""
        scaling = self.cfg.rope_scaling
        if scaling is not None and scaling.rope_type == "dynamic" and rope_seq_len is None \
                and self.groups.cp_size > 1:
            # dynamic NTK needs the whole sequence's length; a CP rank sees only its shard
            raise ValueError("language.rope_scaling.rope_type='dynamic' with parallel.cp > 1 "
                             "needs the global sequence length (rope_seq_len); the training "
                             "forward does not know it: use linear or yarn scaling under CP")
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rotary_base,
                                  self.config.params_dtype, scaling,
                                  max_position_embeddings=self.cfg.max_position_embeddings,
                                  seq_len=rope_seq_len)  # [b, s, d]
        if isinstance(attention, PackedSeqParams):
            if attention.qkv_format != "thd":
                raise ValueError(f"packed_seq_params.qkv_format={attention.qkv_format!r}: "
                                 f"packed batches use 'thd'")
            # the backend's attention params, once per forward (not per layer)
            attention = attention_params_of(attention, position_ids.device)
        if attention is None or not attention.is_packed:
            return RotarySeqParams(qkv_format="sbhd", attention=attention, inference=inference,
                                   rotary_cos=cos.transpose(0, 1)[:, :, None],
                                   rotary_sin=sin.transpose(0, 1)[:, :, None])
        # THD flattens the batch row-major, as cu_seqlens counts tokens: [b, s, d] -> [t, 1, d]
        return RotarySeqParams(qkv_format="thd", attention=attention, inference=inference,
                               rotary_cos=cos.reshape(-1, 1, cos.shape[-1]),
                               rotary_sin=sin.reshape(-1, 1, sin.shape[-1]))

    # ----------------------------------------------------------------- forward
    def forward(self, decoder_input: torch.Tensor, position_ids: torch.Tensor,
                attention=None, *, inference=None, rope_seq_len: Optional[int] = None
                ) -> torch.Tensor:
        """Decoder layers and final norm: `[s, b, h]` -> `[s, b, h]` (`[s / tp, b, h]` in and
        out under sequence parallel).

        `position_ids [b, s]` drive RoPE, so packed reset-mode batches restart positions per
        sample and a context-parallel shard rotates with its own positions. `attention`: None
        for a dense causal batch; the batch's packed `AttentionParams` (cumulative lengths over
        the row-major flattened `b * s` tokens, leading 0), which keep attention inside each
        sample; under context parallelism the `RingAttentionParams` the spec's ring core takes
        (`models.inputs.build_model_inputs` builds each once per batch). A megatron
        `PackedSeqParams` (`qkv_format="thd"`) is accepted too.
        `inference`: the KV cache of a cached inference forward (`inference.kv_cache`), handed
        to every layer's core attention; `rope_seq_len`: the sequence length dynamic-NTK RoPE
        scales by (default: the largest position + 1, which under CP is only the shard's).
        """
        if decoder_input.dim() != 3 or decoder_input.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"decoder_input must be [s, b, {self.cfg.hidden_size}], "
                             f"got shape {tuple(decoder_input.shape)}")
        b = decoder_input.shape[1]
        if position_ids.dim() != 2 or position_ids.shape[0] != b:
            raise ValueError(f"position_ids must be [b={b}, s], got {tuple(position_ids.shape)}")
        params = self.rotary_params(position_ids, attention, inference=inference,
                                    rope_seq_len=rope_seq_len)
        if params.qkv_format != "thd" or b == 1:
            return self.decoder(decoder_input, attention_mask=None, packed_seq_params=params)
        if self.sequence_parallel:
            raise ValueError("packed batches with b > 1 rows cannot be sequence-parallel "
                             "(rows would interleave across tp ranks); use b = 1")
        # megatron's THD path has a dummy batch dim of 1: lay the rows end to end
        s = decoder_input.shape[0]
        flat = decoder_input.transpose(0, 1).reshape(b * s, 1, -1)
        out = self.decoder(flat, attention_mask=None, packed_seq_params=params)
        return out.reshape(b, s, -1).transpose(0, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden `[s, b, h]` (`[s / tp, b, h]` under sequence parallel) -> this rank's
        vocabulary slice of the logits `[s, b, V_pad / tp]` (padding columns included)."""
        out, _ = self.output_layer(hidden, weight=self.output_weight)
        return out
