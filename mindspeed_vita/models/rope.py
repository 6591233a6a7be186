"""Rotary position embedding: inverse frequencies, scaling beyond the trained length, cos/sin.

Half-rotation RoPE (Qwen2): angle(p, i) = p * inv_freq[i] for i < d/2, duplicated over both
halves of the head dim. Scaling changes inv_freq (and, for YaRN, multiplies cos/sin by an
attention factor) so a model trained at `original_max_position_embeddings` reads longer inputs:

* ``linear`` (position interpolation): inv_freq / factor.
* ``dynamic`` (NTK-aware, dynamic): the base grows with the sequence length L once L exceeds
  the trained length: base' = base * (factor * L / L_max - (factor - 1)) ** (d / (d - 2)).
  L is the number of positions of the forward (max position + 1), as transformers computes it
  for one forward from a fresh module.
* ``yarn``: per-frequency blend of interpolated and original frequencies with a linear ramp
  between the correction dims of `beta_fast` / `beta_slow` rotations, and cos/sin scaled by
  `attention_factor` (default 0.1 * ln(factor) + 1).

Every formula is computed in fp32 as transformers' `modeling_rope_utils` does, so cos/sin equal
its rotary embeddings bit for bit (tested in tests/models/test_rope.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from mindspeed_vita.config.model import RopeScalingConfig


def _base_inv_freq(head_dim: int, base: float, device=None) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    return 1.0 / (base ** (exponent / head_dim))


def yarn_attention_factor(scaling: RopeScalingConfig) -> float:
    """The factor YaRN multiplies cos/sin with (transformers' default when none is given)."""
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return float(mscale(scaling.factor, scaling.mscale) /
                     mscale(scaling.factor, scaling.mscale_all_dim))
    return mscale(scaling.factor)


def _yarn_inv_freq(head_dim: int, base: float, scaling: RopeScalingConfig,
                   original_max: int, device=None) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        # the dim whose wavelength makes `rotations` turns over the trained length
        return head_dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = (1 - ramp).to(device=device, dtype=torch.float)
    pos_freqs = base ** (torch.arange(0, head_dim, 2).to(device=device, dtype=torch.float)
                         / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    return interpolated * (1 - keep_original) + extrapolated * keep_original


def rope_inv_freq(head_dim: int, base: float, scaling: Optional[RopeScalingConfig] = None, *,
                  max_position_embeddings: int, seq_len: Optional[int] = None, device=None
                  ) -> Tuple[torch.Tensor, float]:
    """(inv_freq `[head_dim / 2]` fp32, factor cos/sin are multiplied with).

    `max_position_embeddings` is the model's trained length (the `dynamic` threshold);
    `seq_len` the positions of this forward (only `dynamic` uses it).
    """
    if scaling is None:
        return _base_inv_freq(head_dim, base, device), 1.0
    if scaling.rope_type == "linear":
        return _base_inv_freq(head_dim, base, device) / scaling.factor, 1.0
    if scaling.rope_type == "dynamic":
        length = max(seq_len or max_position_embeddings, max_position_embeddings)
        grown = base * ((scaling.factor * length / max_position_embeddings)
                        - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
        return _base_inv_freq(head_dim, grown, device), 1.0
    original = scaling.original_max_position_embeddings or max_position_embeddings
    return _yarn_inv_freq(head_dim, base, scaling, original, device), yarn_attention_factor(scaling)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype,
                   scaling: Optional[RopeScalingConfig] = None, *,
                   max_position_embeddings: Optional[int] = None,
                   seq_len: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[..., head_dim]` for integer `position_ids [...]`, cast to `dtype`.

    Without scaling this is plain RoPE. With `dynamic` scaling, `seq_len` is the number of
    positions the sequence spans (default: max position + 1, a host sync; callers that know
    it on the host pass it).
    """
    if scaling is not None and max_position_embeddings is None:
        raise ValueError("RoPE scaling needs max_position_embeddings (the trained length)")
    if scaling is not None and scaling.rope_type == "dynamic" and seq_len is None:
        seq_len = int(position_ids.max()) + 1
    inv_freq, attention_factor = rope_inv_freq(
        head_dim, base, scaling, max_position_embeddings=max_position_embeddings or 0,
        seq_len=seq_len, device=position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # [..., d/2]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)
