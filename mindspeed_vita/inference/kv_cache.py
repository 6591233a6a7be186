"""Key/value caches for incremental decoding: one process (`KVCache`) or sharded over the CP
group (`ShardedKVCache`).

The model receives a cache as an explicit argument (`LongVitaModel.prefill` / `decode_step`),
threads it to every layer inside the per-forward `RotarySeqParams.inference`, and the layer
spec's cached core attention (`models.cached_attention`) calls `update(layer_number, key,
value)` with this step's rotated keys/values in megatron's layout `[s_new, b, n_kv_local, d]`,
getting back every key/value this rank holds for that layer. Buffers are allocated once for
`max_length` positions, so a decode step costs no allocation. After the forward the model calls
`advance()`, which commits the step.

Under context parallelism each rank keeps the keys of ITS zigzag slices of the prompt (the
rows its ring-attention prefill computed; padding rows past the prompt are dropped), and each
generated token's key goes to the rank holding the fewest keys (lowest rank on ties), so the
shards stay within one key of even whatever the prompt length. Every rank runs the decode step
on the same new token and knows every shard's length on the host, so they agree on the owner
without communicating.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


class KVCache:
    """Per-layer K/V buffers of one process; `length` positions are stored."""

    def __init__(self, num_layers: int, max_length: int):
        if max_length <= 0:
            raise ValueError(f"KVCache: max_length must be positive, got {max_length}")
        self.max_length = max_length
        self.length = 0
        self._pending = 0  # positions written by the current step (committed by `advance`)
        self._keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self._values: List[Optional[torch.Tensor]] = [None] * num_layers

    def _write(self, i: int, key: torch.Tensor, value: torch.Tensor) -> int:
        """Store `key/value [s_new, b, n, d]` after the committed positions of layer `i`."""
        s_new = key.shape[0]
        end = self.length + s_new
        if end > self.max_length:
            raise ValueError(f"KVCache: {end} positions exceed max_length={self.max_length} "
                             f"(prompt + max_new_tokens)")
        if self._keys[i] is None:
            self._keys[i] = key.new_empty((self.max_length,) + tuple(key.shape[1:]))
            self._values[i] = value.new_empty((self.max_length,) + tuple(value.shape[1:]))
        self._keys[i][self.length:end] = key
        self._values[i][self.length:end] = value
        self._pending = s_new
        return end

    def update(self, layer_number: int, key: torch.Tensor, value: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store this step's `key/value [s_new, b, n, d]` for layer `layer_number` (1-based,
        megatron's numbering) and return all cached positions of that layer."""
        i = layer_number - 1
        end = self._write(i, key, value)
        return self._keys[i][:end], self._values[i][:end]

    def advance(self) -> None:
        """Commit the positions written by the step that just ran (once per forward)."""
        self.length += self._pending
        self._pending = 0


class ShardedKVCache(KVCache):
    """This rank's share of a KV cache sharded over the context-parallel group.

    `cp_group`: the CP process group (what `cp_decode_attention` merges over); `cp_rank`,
    `cp_size`: this rank's place in it. Use `begin_prefill` before the prefill forward and
    `begin_decode` before every decode step; the cached attention asks `is_prefill`.
    """

    def __init__(self, num_layers: int, max_length: int, *, cp_group, cp_rank: int,
                 cp_size: int):
        super().__init__(num_layers, max_length)
        self.cp_group = cp_group
        self.cp_rank = cp_rank
        self.cp_size = cp_size
        #: keys every rank holds (the same list on every rank)
        self.shard_lengths: List[int] = [0] * cp_size
        self.is_prefill = False
        self._owner: Optional[int] = None
        self._keep: Optional[int] = None

    def begin_prefill(self, valid_per_rank: Sequence[int]) -> None:
        """The next forward is the ring prefill; rank r's first `valid_per_rank[r]` local rows
        are prompt tokens (the rest padding to a multiple of 2 * cp: dropped on `advance`)."""
        if len(valid_per_rank) != self.cp_size:
            raise ValueError(f"ShardedKVCache: {len(valid_per_rank)} shard lengths for "
                             f"cp={self.cp_size}")
        self.is_prefill = True
        self._keep = int(valid_per_rank[self.cp_rank])
        self._planned = [int(n) for n in valid_per_rank]

    def begin_decode(self) -> int:
        """The next forward is one decode step; returns the rank that stores its key/value
        (the one holding the fewest keys, lowest rank on ties)."""
        self.is_prefill = False
        self._owner = min(range(self.cp_size), key=lambda r: (self.shard_lengths[r], r))
        return self._owner

    @property
    def holds_step(self) -> bool:
        """Whether this rank stores the keys of the current step."""
        return self.is_prefill or self._owner == self.cp_rank

    def update(self, layer_number: int, key: torch.Tensor, value: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys here when this rank holds them; return this rank's keys
        (possibly none: `[0, b, n, d]`)."""
        i = layer_number - 1
        if self.holds_step:
            end = self._write(i, key, value)
        else:
            end = self.length
            if self._keys[i] is None:
                self._keys[i] = key.new_empty((self.max_length,) + tuple(key.shape[1:]))
                self._values[i] = value.new_empty((self.max_length,) + tuple(value.shape[1:]))
        return self._keys[i][:end], self._values[i][:end]

    def advance(self) -> None:
        """Commit the step: after the prefill keep only the prompt rows; after a decode step
        count the new key on its owner."""
        if self.is_prefill:
            self.length = self._keep
            self.shard_lengths = list(self._planned)
            self.is_prefill = False
        else:
            if self._owner is None:
                raise ValueError("ShardedKVCache: begin_decode() was not called before the step")
            self.shard_lengths[self._owner] += 1
            if self._owner == self.cp_rank:
                self.length += 1
            self._owner = None
        self._pending = 0
