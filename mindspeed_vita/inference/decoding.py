"""The two ways a prompt is decoded: with a KV cache (prefill once, one row per step), or the
paper's fixed-length scheme (a full forward of the padded sequence per token).

Both take the prompt's token ids `[b, s]` (every row the same length) and pixels, and expose
`prefill() -> logits [b, vocab]` and `step(tokens [b], position) -> logits [b, vocab]`, the
next-token logits of every row, the same on every rank of the model's groups. Both call only
the model's public methods (`build_inputs`, `prefill`, `decode_step`).

Under context parallelism the prompt is padded at its end to a multiple of 2 * cp (zigzag
chunks must be equal); causal attention keeps the padding out of every prompt row, the KV
cache drops the padding rows' keys after the prefill, and the fixed-length mode overwrites them
with the generated tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from mindspeed_vita.inference.kv_cache import KVCache, ShardedKVCache
from mindspeed_vita.models.inputs import batch_from_tensors
from mindspeed_vita.parallel.zigzag import zigzag_positions

DECODE_MODES = ("kv-cache", "fixed-length")


def padded_length(length: int, cp_size: int) -> int:
    """`length` rounded up to a multiple of 2 * cp (1 at CP 1: no padding)."""
    multiple = 2 * cp_size if cp_size > 1 else 1
    return -(-length // multiple) * multiple


def _pad_right(input_ids: torch.Tensor, length: int) -> torch.Tensor:
    """`[b, s]` -> `[b, length]`, repeating the last token (never a visual context token: a
    rendered prompt ends with the assistant header), so the visual plan is unchanged."""
    extra = length - input_ids.shape[1]
    if extra == 0:
        return input_ids
    return torch.cat([input_ids, input_ids[:, -1:].expand(-1, extra)], dim=1)


class CachedDecoding:
    """Prefill once into a KV cache (sharded over the CP group under CP), then one row per step.
    """

    def __init__(self, model, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                 max_new_tokens: int):
        self.model = model
        groups = model.groups
        self.cp_size = groups.cp_size
        b, self.prompt_len = input_ids.shape
        s_pad = padded_length(self.prompt_len, self.cp_size)
        self.input_ids = _pad_right(input_ids.cpu(), s_pad)
        self.pixel_values = pixel_values
        num_layers = model.cfg.language.num_layers
        local = s_pad // self.cp_size
        # a rank holds its prompt slices plus at most its share of the new keys; + cp covers
        # the rounding of that share
        if self.cp_size == 1:
            self.cache = KVCache(num_layers, s_pad + max_new_tokens)
            self.valid = None
        else:
            self.cache = ShardedKVCache(num_layers, local + max_new_tokens // self.cp_size
                                        + self.cp_size, cp_group=groups.cp,
                                        cp_rank=groups.cp_rank, cp_size=self.cp_size)
            self.valid = [sum(1 for p in zigzag_positions([s_pad], self.cp_size, r)
                              if p < self.prompt_len) for r in range(self.cp_size)]

    def prefill(self) -> torch.Tensor:
        """Next-token logits `[b, vocab]` after the prompt."""
        s_pad = self.input_ids.shape[1]
        positions = torch.arange(s_pad)[None].expand(self.input_ids.shape[0], -1)
        inputs = self.model.build_inputs(
            batch_from_tensors(self.input_ids, positions, self.pixel_values), with_labels=False)
        if self.valid is not None:
            self.cache.begin_prefill(self.valid)
        return self.model.prefill(inputs, self.cache, predict_position=self.prompt_len - 1)

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Feed `tokens [b]` at global `position`; next-token logits `[b, vocab]`."""
        if self.valid is not None:
            self.cache.begin_decode()
        return self.model.decode_step(tokens.view(-1, 1), position, self.cache)


class FixedLengthDecoding:
    """The paper's scheme: the prompt padded to one fixed length (prompt + max_new_tokens,
    rounded to 2 * cp), and for every token a full forward of that sequence through the same
    (ring-attention) model forward, the head on the predicting row only. No cache: exact, and
    the baseline KV-cache decoding is measured against."""

    def __init__(self, model, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                 max_new_tokens: int):
        self.model = model
        b, self.prompt_len = input_ids.shape
        length = padded_length(self.prompt_len + max_new_tokens, model.groups.cp_size)
        self.input_ids = _pad_right(input_ids.cpu(), length).clone()
        self.positions = torch.arange(length)[None].expand(b, -1)
        self.pixel_values = pixel_values

    def _forward(self, predict_position: int) -> torch.Tensor:
        inputs = self.model.build_inputs(
            batch_from_tensors(self.input_ids, self.positions, self.pixel_values),
            with_labels=False)
        return self.model.prefill(inputs, None, predict_position=predict_position)

    def prefill(self) -> torch.Tensor:
        """Next-token logits `[b, vocab]` after the prompt."""
        return self._forward(self.prompt_len - 1)

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Write `tokens [b]` at `position`, run the whole fixed-length sequence again."""
        self.input_ids[:, position] = tokens.cpu()
        return self._forward(position)


def make_decoding(mode: str, model, input_ids: torch.Tensor,
                  pixel_values: Optional[torch.Tensor], max_new_tokens: int):
    """The decoding strategy `mode` (`inference.decode_mode`) names."""
    if mode == "kv-cache":
        return CachedDecoding(model, input_ids, pixel_values, max_new_tokens)
    if mode == "fixed-length":
        return FixedLengthDecoding(model, input_ids, pixel_values, max_new_tokens)
    raise ValueError(f"inference.decode_mode: unknown mode {mode!r}; choose one of "
                     f"{', '.join(DECODE_MODES)}")
