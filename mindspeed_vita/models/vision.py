"""InternViT vision encoder (InternViT-300M-448px architecture).

Architecture only; the mapping to and from HF / original InternViT weight names lives in
`mindspeed_vita.convert.vision_weights`.

Parameter names of `InternViT` (shapes for width C, MLP width F, patch P, N = (image/P)^2):

=========================================  ============================  ======================
name                                       shape                         meaning
=========================================  ============================  ======================
patch_embedding.weight / .bias             [C, 3, P, P] / [C]            Conv2d, stride P
class_embedding                            [1, 1, C]                     CLS token
position_embedding                         [1, 1 + N, C]                 learned, CLS row first
layers.{i}.attn_norm.weight / .bias        [C]                           LayerNorm before attn
layers.{i}.attn.qkv.weight / .bias         [3C, C] / [3C]                fused q, k, v (in order)
layers.{i}.attn.proj.weight / .bias        [C, C] / [C]                  attention output
layers.{i}.attn_scale                      [C]                           layer scale, attn branch
layers.{i}.mlp_norm.weight / .bias         [C]                           LayerNorm before MLP
layers.{i}.mlp.fc1.weight / .bias          [F, C] / [F]                  MLP in (GELU after)
layers.{i}.mlp.fc2.weight / .bias          [C, F] / [C]                  MLP out
layers.{i}.mlp_scale                       [C]                           layer scale, MLP branch
=========================================  ============================  ======================

The qkv bias exists only when `VisionConfig.qkv_bias`. There is no final norm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from backends.attention_params import AttentionParams
from backends.base import Backend
from mindspeed_vita.config.model import VisionConfig

#: the ViT attends densely and bidirectionally; the params hold no tensors, so one serves all
_VIT_ATTENTION = AttentionParams.dense()


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection."""

    def __init__(self, config: VisionConfig, backend: Optional[Backend]):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.backend = backend
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, s, C] -> [b, s, C]."""
        b, s, width = x.shape
        # [b, s, 3C] -> three [b, s, n, d] (the fused weight stacks q, k, v along dim 0)
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).unbind(dim=2)
        if self.backend is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        else:
            out = self.backend.attention(q, k, v, _VIT_ATTENTION)
        return self.proj(out.reshape(b, s, width))


class VisionMLP(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm block with layer scale on both residual branches:
    `x + attn_scale * attn(attn_norm(x))`, then `x + mlp_scale * mlp(mlp_norm(x))`."""

    def __init__(self, config: VisionConfig, backend: Optional[Backend]):
        super().__init__()
        width = config.hidden_size
        self.attn_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config, backend)
        self.attn_scale = nn.Parameter(torch.full((width,), config.layer_scale_init))
        self.mlp_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.mlp_scale = nn.Parameter(torch.full((width,), config.layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_scale * self.attn(self.attn_norm(x))
        return x + self.mlp_scale * self.mlp(self.mlp_norm(x))


class InternViT(nn.Module):
    """InternViT encoder: pixels [n, 3, H, W] -> patch features [n, (H/P)*(W/P), C], CLS dropped.

    Args:
        config: encoder shape; `config.select_layer` picks the output in InternVL's convention
            (index into (embeddings, layer 1, ..., layer L); -1 = last layer). All layers are
            built so checkpoints load unchanged; only those up to `select_layer` run.
        backend: provides `attention(q, k, v, AttentionParams.dense())` on [b, s, n, d] so
            device kernels are used; None computes attention with
            `torch.nn.functional.scaled_dot_product_attention`.
        recompute: recompute each layer's activations in backward (activation checkpointing),
            as stage 2 does for the ViT. May also be toggled later through `self.recompute`.
    """

    def __init__(self, config: VisionConfig, backend: Optional[Backend] = None,
                 recompute: bool = False):
        super().__init__()
        num_outputs = config.num_layers + 1
        if not -num_outputs <= config.select_layer < num_outputs:
            raise ValueError(
                f"vision.select_layer={config.select_layer} is out of range for "
                f"{config.num_layers} layers (valid: {-num_outputs}..{num_outputs - 1})")
        if config.encode_chunk_size < 1:
            raise ValueError(
                f"vision.encode_chunk_size={config.encode_chunk_size} must be at least 1")
        self.config = config
        self.recompute = recompute
        self.grid_side = config.image_size // config.patch_size
        width = config.hidden_size
        self.patch_embedding = nn.Conv2d(
            3, width, kernel_size=config.patch_size, stride=config.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid_side ** 2, width))
        self.layers = nn.ModuleList(
            VisionLayer(config, backend) for _ in range(config.num_layers))
        # number of layers whose output is needed: hidden_states[select_layer] of InternVL
        self.num_layers_run = config.select_layer % num_outputs

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def layer_id(param_name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: embeddings 0, `layers.{i}.*` i + 1."""
        if param_name.startswith("layers."):
            return int(param_name.split(".")[1]) + 1
        if param_name.split(".")[0] in ("patch_embedding", "class_embedding", "position_embedding"):
            return 0
        raise KeyError(f"InternViT has no parameter named {param_name!r}")

    def position_embedding_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding [1, 1 + grid_h*grid_w, C] for a grid_h x grid_w patch grid.

        The stored patch table (a square grid) is resized with bicubic interpolation
        (align_corners=False) computed in fp32, as InternViT does; the CLS row is kept.
        """
        if (grid_h, grid_w) == (self.grid_side, self.grid_side):
            return self.position_embedding
        table = self.position_embedding
        width = table.shape[-1]
        patch_table = table[:, 1:].float().reshape(1, self.grid_side, self.grid_side, width)
        resized = F.interpolate(patch_table.permute(0, 3, 1, 2), size=(grid_h, grid_w),
                                mode="bicubic", align_corners=False)
        resized = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, width).to(table.dtype)
        return torch.cat([table[:, :1], resized], dim=1)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"InternViT expects pixel_values [n, 3, H, W], got {tuple(pixel_values.shape)}")
        height, width = pixel_values.shape[-2:]
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"pixel_values of size {height}x{width} is not divisible by "
                f"vision.patch_size={patch}")

    def _encode(self, pixel_values: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One chunk: [m, 3, H, W] -> [m, patches, C]."""
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + position
        for layer in self.layers[: self.num_layers_run]:
            if self.recompute and torch.is_grad_enabled():
                # NOTE: the ViT has no dropout, so no RNG state needs restoring in the recompute
                # (preserve_rng_state=False also keeps torch.utils.checkpoint device-agnostic).
                x = checkpoint(layer, x, use_reentrant=False, preserve_rng_state=False)
            else:
                x = layer(x)
        return x[:, 1:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, H, W] (H, W multiples of the patch) -> [n, (H/P)*(W/P), C].

        Tiles/frames are encoded `config.encode_chunk_size` at a time and concatenated, so
        thousands of frames fit in memory; tiles never interact, so chunking is exact.
        """
        self._check_pixels(pixel_values)
        patch = self.config.patch_size
        grid_h, grid_w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        pixel_values = pixel_values.to(self.patch_embedding.weight.dtype)
        if pixel_values.shape[0] == 0:
            return pixel_values.new_zeros(0, grid_h * grid_w, self.config.hidden_size)
        position = self.position_embedding_for(grid_h, grid_w)
        chunk = self.config.encode_chunk_size
        outputs = [self._encode(part, position) for part in pixel_values.split(chunk)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

