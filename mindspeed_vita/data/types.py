"""The objects that flow one way through the data pipeline.

JSONL line --records--> Sample --render--> RenderedSample --mixture/pack--> PackedBatch
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

#: label value that takes no part in the loss (transformers / megatron convention)
IGNORE_INDEX = -100


@dataclass
class Message:
    """One conversation turn. `role` is normalised to "system" | "user" | "assistant"."""

    role: str
    content: str


@dataclass
class Sample:
    """A validated record: media paths are absolute (already joined with the source root)."""

    source: str
    line: int  # 1-based line number in the source JSONL file
    messages: List[Message]
    images: List[str] = field(default_factory=list)
    videos: List[str] = field(default_factory=list)
    path: str = ""  # the JSONL file the record came from (for messages)


@dataclass
class RenderedSample:
    """Token ids, labels and pixels of one sample, ready to pack.

    `pixel_values` holds every visual unit (image tiles, thumbnails, video frames) in the order
    their context-token spans appear in `input_ids`; each unit yields exactly
    `tokens_per_tile` (256 at full size) context tokens after pixel shuffle.
    """

    source: str
    line: int
    input_ids: torch.Tensor  # [s] int64
    labels: torch.Tensor  # [s] int64, IGNORE_INDEX where there is no loss
    pixel_values: torch.Tensor  # [n_units, 3, H, W] float32, normalised
    image_grids: List[Tuple[int, int]] = field(default_factory=list)  # (cols, rows) per image
    num_frames: List[int] = field(default_factory=list)  # frames per video

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class PackedBatch:
    """One fixed-length micro batch (b rows of seq_length tokens).

    reset mode: `position_ids` restart at every sample and `cu_seqlens` (int32, leading 0,
    over the flattened b*s tokens, padding counted as its own final segment) keeps attention
    inside each sample. joint mode: `cu_seqlens` is None and positions run on.
    """

    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64 (unshifted: labels[i] is the target AT position i)
    position_ids: torch.Tensor  # [b, s] int64
    pixel_values: torch.Tensor  # [n_units, 3, H, W]
    cu_seqlens: Optional[torch.Tensor] = None  # [n_segments + 1] int32 or None (joint)
    samples: List[Tuple[str, int]] = field(default_factory=list)  # (source, line) packed here
    num_real_tokens: int = 0  # tokens that are not padding
