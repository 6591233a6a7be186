"""Key/value cache for incremental decoding, one preallocated buffer pair per decoder layer.

The core attention calls `update(layer_number, key, value)` with this step's rotated keys and
values in megatron's layout `[s_new, b, n_kv_local, d]` and gets back every cached position
`[s_total, b, n_kv_local, d]`. Buffers are allocated once for `max_length` tokens, so decoding
costs O(1) allocations per step instead of a growing concatenation.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


class KVCache:
    """Per-layer K/V buffers; `length` is the number of positions already stored."""

    def __init__(self, num_layers: int, max_length: int):
        if max_length <= 0:
            raise ValueError(f"KVCache: max_length must be positive, got {max_length}")
        self.max_length = max_length
        self.length = 0
        self._pending = 0  # positions added by the current step (committed by `advance`)
        self._keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self._values: List[Optional[torch.Tensor]] = [None] * num_layers

    def update(self, layer_number: int, key: torch.Tensor, value: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store this step's `key/value [s_new, b, n, d]` for layer `layer_number` (1-based,
        megatron's numbering) and return all cached positions of that layer."""
        i = layer_number - 1
        s_new = key.shape[0]
        end = self.length + s_new
        if end > self.max_length:
            raise ValueError(f"KVCache: {end} positions exceed max_length={self.max_length} "
                             f"(prompt + max_new_tokens)")
        if self._keys[i] is None:
            shape = (self.max_length,) + tuple(key.shape[1:])
            self._keys[i] = key.new_empty(shape)
            self._values[i] = value.new_empty((self.max_length,) + tuple(value.shape[1:]))
        self._keys[i][self.length:end] = key
        self._values[i][self.length:end] = value
        self._pending = s_new
        return self._keys[i][:end], self._values[i][:end]

    def advance(self) -> None:
        """Commit the positions written by the step that just ran (call once per forward)."""
        self.length += self._pending
        self._pending = 0
