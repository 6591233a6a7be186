"""Pixel shuffle + MLP projector: ViT patch features -> LLM embeddings.

Parameter names of `VisionProjector` (K = C / ratio^2, the shuffled width; H = LLM width):

=====================  =====================================  ==============================
name                   "long-vita"                            "internvl"
=====================  =====================================  ==============================
norm.weight / .bias    [K]                                    [K]
fc1.weight (.bias)     [C, K], no bias                        [H, K] + bias [H]
fc2.weight (.bias)     [H, C], no bias                        [H, H] + bias [H]
=====================  =====================================  ==============================

forward: norm -> fc1 -> exact GELU -> fc2.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mindspeed_vita.config.model import ProjectorConfig


def shuffle_factor(ratio: float) -> int:
    """The integer s with ratio == 1/s (0.5 -> 2); raises if the ratio is not of that form."""
    factor = round(1.0 / ratio) if ratio > 0 else 0
    if factor < 1 or not math.isclose(factor * ratio, 1.0, rel_tol=1e-9):
        raise ValueError(
            f"projector.downsample_ratio={ratio} must be 1/s for an integer s >= 1 (e.g. 0.5)")
    return factor


def _square_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{num_patches} patches do not form a square grid; pass features as [n, h, w, c] "
            f"(or grid_hw) for a non-square grid")
    return side


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Merge each s x s block of patches (s = 1/ratio) into one token, InternVL "v2" order.

    x: [n, h*w, c] (square grid) or [n, h, w, c] -> [n, (h/s)*(w/s), c*s*s].

    Output token (i, j) (row-major over the (h/s) x (w/s) grid) holds, channel block by channel
    block, the patches (s*i + dy, s*j + dx) for dy in 0..s-1 (outer) and dx in 0..s-1 (inner):
    `out[n, i*(w/s) + j, (dy*s + dx)*c : (dy*s + dx + 1)*c] = x[n, s*i + dy, s*j + dx, :]`.
    This is what InternVL's view/permute/view/permute sequence produces (the second permute,
    the "v2" fix, keeps the image un-transposed).
    """
    s = shuffle_factor(ratio)
    if x.dim() == 3:
        side = _square_side(x.shape[1])
        x = x.reshape(x.shape[0], side, side, x.shape[2])
    if x.dim() != 4:
        raise ValueError(f"pixel_shuffle expects [n, h*w, c] or [n, h, w, c], got {tuple(x.shape)}")
    n, h, w, c = x.shape
    if h % s or w % s:
        raise ValueError(f"a {h}x{w} patch grid is not divisible by the shuffle factor {s}")
    # [n, h, w, c] -> [n, h/s, dy, w/s, dx, c] -> [n, h/s, w/s, dy, dx, c]
    x = x.reshape(n, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // s) * (w // s), s * s * c)


class VisionProjector(nn.Module):
    """Pixel shuffle then LayerNorm -> Linear -> GELU -> Linear (see module doc for variants).

    Args:
        cfg: projector config (variant, downsample ratio, LayerNorm eps).
        vit_width: ViT hidden size C.
        llm_hidden: language model hidden size.
        recompute: keep only the input for backward and recompute pixel shuffle, norm and MLP
            there (activation checkpointing, as stage 2's "vision" recompute does for ViT and
            projector). May also be toggled later through `self.recompute`.
    """

    def __init__(self, cfg: ProjectorConfig, vit_width: int, llm_hidden: int,
                 recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.ratio = cfg.downsample_ratio
        self.variant = cfg.variant
        factor = shuffle_factor(cfg.downsample_ratio)
        self.vit_width = vit_width
        shuffled = vit_width * factor * factor
        self.norm = nn.LayerNorm(shuffled, eps=cfg.layer_norm_eps)
        if cfg.variant == "long-vita":
            # Long-VITA's bottleneck is the ViT width, and neither linear has a bias.
            self.fc1 = nn.Linear(shuffled, vit_width, bias=False)
            self.fc2 = nn.Linear(vit_width, llm_hidden, bias=False)
        elif cfg.variant == "internvl":
            self.fc1 = nn.Linear(shuffled, llm_hidden, bias=True)
            self.fc2 = nn.Linear(llm_hidden, llm_hidden, bias=True)
        else:
            raise ValueError(f"projector.variant={cfg.variant!r} is not 'long-vita' or 'internvl'")

    def forward(self, vit_features: torch.Tensor,
                grid_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """vit_features [n, patches, C] -> [n, tokens_per_tile, llm_hidden].

        `grid_hw` is the (h, w) patch grid; None means a square grid.
        """
        if vit_features.dim() != 3 or vit_features.shape[-1] != self.vit_width:
            raise ValueError(
                f"VisionProjector expects [n, patches, {self.vit_width}], "
                f"got {tuple(vit_features.shape)}")
        if grid_hw is not None:
            h, w = grid_hw
            if h * w != vit_features.shape[1]:
                raise ValueError(
                    f"grid_hw={grid_hw} does not match {vit_features.shape[1]} patches")
            vit_features = vit_features.reshape(vit_features.shape[0], h, w, self.vit_width)
        if self.recompute and torch.is_grad_enabled():
            # NOTE: no dropout here, so no RNG state needs restoring in the recompute
            # (preserve_rng_state=False also keeps torch.utils.checkpoint device-agnostic).
            return checkpoint(self._project, vit_features, use_reentrant=False,
                              preserve_rng_state=False)
        return self._project(vit_features)

    def _project(self, vit_features: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle -> norm -> fc1 -> GELU -> fc2 (what `recompute` reruns in backward)."""
        x = pixel_shuffle(vit_features, self.ratio)
        return self.fc2(F.gelu(self.fc1(self.norm(x))))
