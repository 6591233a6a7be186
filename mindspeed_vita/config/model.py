"""Model section of the configuration: vision encoder, projector, language model, heads."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from mindspeed_vita.config.base import Section


class VisionConfig(Section):
    """InternViT encoder (InternViT-300M-448px at full size)."""

    image_size: int = 448
    """Tile / frame side in pixels the encoder was trained at."""
    patch_size: int = 14
    """Side of one ViT patch in pixels."""
    hidden_size: int = 1024
    """ViT width."""
    num_layers: int = 24
    """Number of encoder layers."""
    num_heads: int = 16
    """Attention heads of the encoder."""
    intermediate_size: int = 4096
    """MLP width (GELU)."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    qkv_bias: bool = True
    """Fused qkv projection carries a bias."""
    layer_scale_init: float = 0.1
    """Initial value of the layer-scale vectors (ls1 / ls2)."""
    select_layer: int = -1
    """Which encoder layer's output is used (-1 = last)."""
    encode_chunk_size: int = 256
    """Tiles/frames encoded per chunk, so thousands of frames fit in memory."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @model_validator(mode="after")
    def _check(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        return self


class ProjectorConfig(Section):
    """Pixel shuffle then MLP from ViT features to LLM embeddings."""

    variant: Literal["long-vita", "internvl"] = "long-vita"
    """long-vita: LN -> Linear(4*vit -> vit, no bias) -> GELU -> Linear(vit -> llm, no bias);
    internvl: LN -> Linear(4*vit -> llm) -> GELU -> Linear(llm -> llm), with bias."""
    downsample_ratio: float = 0.5
    """Pixel-shuffle ratio per side (0.5 -> 4x fewer tokens)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon of the projector (torch default, as InternVL)."""


class RopeScalingConfig(Section):
    """RoPE scaling beyond the trained length (transformers' `rope_scaling` names and values)."""

    rope_type: Literal["linear", "dynamic", "yarn"]
    """linear: position interpolation; dynamic: NTK-aware base growth with the sequence length;
    yarn: per-frequency interpolation ramp plus an attention factor."""
    factor: float = Field(..., ge=1.0)
    """How many times the trained length the model should read."""
    original_max_position_embeddings: Optional[int] = Field(None, gt=0)
    """yarn: the length the model was trained at (default: language.max_position_embeddings)."""
    beta_fast: float = Field(32.0, gt=0)
    """yarn: rotations above which frequencies are kept (extrapolated)."""
    beta_slow: float = Field(1.0, gt=0)
    """yarn: rotations below which frequencies are fully interpolated."""
    attention_factor: Optional[float] = Field(None, gt=0)
    """yarn: cos/sin multiplier (default 0.1 * ln(factor) + 1)."""
    mscale: Optional[float] = None
    """yarn (DeepSeek form): numerator mscale of the attention factor."""
    mscale_all_dim: Optional[float] = None
    """yarn (DeepSeek form): denominator mscale of the attention factor."""
    truncate: bool = True
    """yarn: round the correction range to whole dims."""


class LanguageConfig(Section):
    """Qwen2 decoder (Qwen2.5-14B-Instruct at full size)."""

    hidden_size: int = 5120
    """Model width."""
    num_layers: int = 48
    """Decoder layers."""
    num_attention_heads: int = 40
    """Query heads."""
    num_query_groups: int = 8
    """Key/value heads (GQA groups)."""
    ffn_hidden_size: int = 13824
    """SwiGLU intermediate width."""
    vocab_size: int = 152064
    """Vocabulary size of the checkpoint (padded further for TP when needed)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rotary_base: float = 1_000_000.0
    """RoPE base (theta)."""
    max_position_embeddings: int = 1_310_720
    """Longest position the rotary table is built for (the trained length for RoPE scaling)."""
    rope_scaling: Optional[RopeScalingConfig] = None
    """RoPE scaling to read beyond the trained length (None: plain RoPE)."""
    qkv_bias: bool = True
    """q/k/v projections carry a bias (o_proj and MLP do not)."""
    tie_word_embeddings: bool = False
    """Share input embedding and output projection."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times TP (megatron convention)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @model_validator(mode="after")
    def _check(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}")
        return self


class ModelConfig(Section):
    """The composed vision-language model."""

    vision: VisionConfig = VisionConfig()
    """Vision encoder."""
    projector: ProjectorConfig = ProjectorConfig()
    """Pixel shuffle + MLP projector."""
    language: LanguageConfig = LanguageConfig()
    """Language model."""
    image_layout: Literal["long-vita", "internvl"] = "long-vita"
    """Token layout of a tiled image: long-vita (thumbnail first in <img>, tile rows in <patch>
    spans) or internvl (tiles then thumbnail inside one <img> span)."""
    min_tiles: int = 1
    """Fewest tiles per image in dynamic tiling."""
    max_tiles: int = 12
    """Most tiles per image in dynamic tiling (the thumbnail is extra)."""
    lm_head: Literal["full", "chunked", "logits-masked"] = "full"
    """Vocabulary projection + loss: full logits, sequence chunks, or only rows that predict a
    label (training) / the last row (inference)."""
    lm_head_chunk_size: int = 4096
    """Rows per projection for the chunked head, and for the logits-masked head when it selects
    more rows than that (its peak is then one chunk of logits too)."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter / compute dtype."""
    tokenizer: Optional[str] = None
    """HF tokenizer directory (None: taken from the checkpoint directory)."""

    @property
    def tokens_per_tile(self) -> int:
        """Context tokens one tile or frame yields after pixel shuffle (256 at full size)."""
        side = self.vision.image_size // self.vision.patch_size
        return int(side * self.projector.downsample_ratio) ** 2

    @model_validator(mode="after")
    def _check(self):
        side = self.vision.image_size // self.vision.patch_size
        if (side * self.projector.downsample_ratio) != int(side * self.projector.downsample_ratio):
            raise ValueError(
                f"projector.downsample_ratio={self.projector.downsample_ratio} does not divide the "
                f"{side}x{side} patch grid of vision.image_size={self.vision.image_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(
                f"min_tiles={self.min_tiles} / max_tiles={self.max_tiles}: need 1 <= min <= max")
        return self
