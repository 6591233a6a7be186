"""Model FLOPs of a training step (vision + projector + LLM), for TFLOP/s and MFU.

Counts multiply-adds as 2 FLOPs; forward + backward = 3x forward. The ViT is first in the
model, so a frozen ViT costs its forward only (nothing before it needs a gradient); the
decoder always costs 3x (its input gradients reach the projector even when it is frozen).
Recompute adds one more forward of what it recomputes. Attention is counted per packed sample
(reset mode) or over the whole row (joint mode), causal pairs only.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

from mindspeed_vita.config.model import ModelConfig

#: dense bf16 peak TFLOP/s per device, matched against the device name (first match wins)
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("910B1", 378.0), ("910B2", 353.0), ("910B3", 313.0), ("910B4", 280.0),
    ("Ascend910", 313.0),
)


def peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak of the device named `device_name`, or None when unknown (e.g. a CPU:
    MFU is then not reported)."""
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def vision_forward_flops(cfg: ModelConfig, units: int) -> Dict[str, float]:
    """Forward FLOPs of the ViT and of the projector for `units` tiles/frames."""
    v = cfg.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1  # patches + CLS
    h, f = v.hidden_size, v.intermediate_size
    per_layer = 2 * tokens * (4 * h * h + 2 * h * f) + 4 * tokens * tokens * h
    patch = 2 * (tokens - 1) * 3 * v.patch_size ** 2 * h
    ctx = cfg.tokens_per_tile
    shuffled = h * int(round(1 / cfg.projector.downsample_ratio)) ** 2
    projector = 2 * ctx * (shuffled * h + h * cfg.language.hidden_size)
    return {"vit": units * (v.num_layers * per_layer + patch), "projector": units * projector}


def language_forward_flops(cfg: ModelConfig, tokens: int, attention_pairs: float,
                           head_rows: int) -> float:
    """Forward FLOPs of the decoder for `tokens` tokens whose attention covers
    `attention_pairs` (query, key) pairs, and of the LM head on `head_rows` rows."""
    lang = cfg.language
    h, kv = lang.hidden_size, lang.num_query_groups * lang.head_dim
    q = lang.num_attention_heads * lang.head_dim
    linear = 2 * tokens * (h * (q + 2 * kv) + q * h + 3 * h * lang.ffn_hidden_size)
    attention = 4 * attention_pairs * q
    head = 2 * head_rows * h * lang.vocab_size
    return lang.num_layers * (linear + attention) + head


def causal_pairs(lengths: Iterable[int]) -> float:
    """(query, key) pairs of causal attention over sequences of these lengths."""
    return float(sum(n * (n + 1) / 2 for n in lengths))


def step_flops(cfg: ModelConfig, *, segment_lengths: Sequence[int], units: int,
               head_rows: int, trainable: Sequence[str], recompute: str) -> Dict[str, float]:
    """Model FLOPs of one micro batch's forward + backward.

    `segment_lengths`: attention segments (packed samples in reset mode, whole rows in joint
    mode); `units`: tiles/frames encoded; `head_rows`: rows through the LM head (the label
    rows for the logits-masked head, every row otherwise)."""
    tokens = sum(segment_lengths)
    fwd = vision_forward_flops(cfg, units)
    lang_fwd = language_forward_flops(cfg, tokens, causal_pairs(segment_lengths), head_rows)
    vit_trains = "vision" in trainable
    projector_trains = vit_trains or "projector" in trainable
    vision = fwd["vit"] * (3 if vit_trains else 1) + fwd["projector"] * (
        3 if projector_trains else 1)
    language = lang_fwd * 3
    if recompute in ("vision", "full"):  # only modules that keep activations are recomputed
        vision += (fwd["vit"] if vit_trains else 0.0) + (
            fwd["projector"] if projector_trains else 0.0)
    if recompute == "full":
        language += lang_fwd
    return {"vision": vision, "language": language, "total": vision + language}
