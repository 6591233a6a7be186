"""The one batch -> model seam: `build_model_inputs(PackedBatch) -> ModelInputs`.

Everything the model needs from a micro batch is prepared here, once, on the host:

* labels shifted (row i predicts token i + 1; the last row of every packed sample in reset mode
  predicts nothing) BEFORE any split - the model never shifts labels;
* under context parallelism, this rank's zigzag shard of tokens, positions and shifted labels,
  and the local cumulative lengths;
* the attention parameters, with the maximum lengths known on the host (no device sync per
  attention call);
* the visual plan: which tiles/frames this rank encodes and where their feature rows go
  (`parallel.visual_exchange`);
* every tensor moved to the compute device once.

The batch is expected on the host, as the data loader yields it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from backends.attention_params import AttentionParams
from backends.base import Backend
from mindspeed_vita.data.types import IGNORE_INDEX, PackedBatch
from mindspeed_vita.errors import UserInputError
from mindspeed_vita.models.core_attention import packed_attention_params
from mindspeed_vita.parallel.ring_attention import RingAttentionParams
from mindspeed_vita.parallel.visual_exchange import plan_visual_exchange
from mindspeed_vita.parallel.zigzag import ZigzagShard

if TYPE_CHECKING:
    from mindspeed_vita.parallel.groups import ParallelGroups


def shift_labels(labels: torch.Tensor, cu_seqlens: Optional[Sequence[int]] = None
                 ) -> torch.Tensor:
    """Unshifted labels `[b, s]` (labels[i] = target AT i) -> shifted (target PREDICTED by row i).

    Row i predicts labels[i + 1]; the last row of each row and, in reset-mode packing, the last
    row of every packed sample (which would otherwise predict the next sample's first token)
    get IGNORE_INDEX. `cu_seqlens`: boundaries (leading 0) over the flattened b*s tokens.
    Must run BEFORE any context-parallel split.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None and len(cu_seqlens) > 2:
        flat = shifted.view(-1)
        ends = [int(c) - 1 for c in cu_seqlens[1:-1] if 0 < int(c) <= flat.numel()]
        flat[ends] = IGNORE_INDEX
    return shifted


@dataclass(frozen=True)
class VisualInputs:
    """The visual work of this rank (device tensors).

    pixel_values: `[n_mine, 3, H, W]`, the units this rank encodes (all of them at CP 1).
    send_index / send_splits / recv_splits: see `parallel.visual_exchange.VisualPlan`.
    context_rows: sequence-major row (`pos * b + batch`) of the local `[s_local, b]` sequence
        that each received feature row overwrites.
    context_mask: bool `[s_local, b]`, True at the context-token rows (sequence-parallel path).
    units_per_rank: units each CP rank encodes.
    """

    pixel_values: torch.Tensor
    send_index: torch.Tensor
    send_splits: tuple
    recv_splits: tuple
    context_rows: torch.Tensor
    context_mask: torch.Tensor
    units_per_rank: tuple


@dataclass(frozen=True)
class ModelInputs:
    """What `LongVitaModel.forward` / `hidden_states` take; built by `build_model_inputs`.

    tokens, position_ids: `[b, s_local]` (this rank's zigzag shard under CP; the whole batch at
    CP 1). labels: `[b, s_local]` SHIFTED (row i's target), IGNORE_INDEX = no loss, or None.
    attention: what every decoder layer's core attention gets: None for a dense causal batch,
    packed `AttentionParams` (cumulative lengths with host max lengths) in reset mode, and
    under context parallelism the ring's `RingAttentionParams` of the local shard.
    visual: None when the batch has no visual units.
    cp_rank / cp_size: this rank's place in the context-parallel group.
    rope_seq_len: the largest position of the WHOLE batch + 1 (host int): the sequence length
    dynamic-NTK RoPE scales by, the same on every CP rank (a shard's own largest position is
    not), and no device read per forward.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    attention: Union[None, AttentionParams, RingAttentionParams]
    visual: Optional[VisualInputs]
    cp_rank: int = 0
    cp_size: int = 1
    rope_seq_len: Optional[int] = None


def _visual_inputs(tokens: torch.Tensor, pixel_values: Optional[torch.Tensor],
                   shard_positions: Sequence[torch.Tensor], cp_rank: int,
                   context_token_ids: Sequence[int], tokens_per_tile: int,
                   device: torch.device) -> Optional[VisualInputs]:
    """The visual plan of this rank, checked against the pixel count, moved to `device`."""
    ids = torch.tensor(sorted(set(int(i) for i in context_token_ids)), dtype=tokens.dtype)
    is_context = torch.isin(tokens, ids)
    n_context = int(is_context.sum())
    n_units = 0 if pixel_values is None else int(pixel_values.shape[0])
    if n_context != n_units * tokens_per_tile:
        raise UserInputError(
            f"the batch has {n_context} visual context tokens but its pixel_values give "
            f"{n_units * tokens_per_tile} feature rows ({n_units} tiles/frames x "
            f"{tokens_per_tile}); prompt tags and images disagree")
    if n_units == 0:
        return None
    plan = plan_visual_exchange(is_context, shard_positions, tokens_per_tile, cp_rank)
    local = shard_positions[cp_rank]
    mask = is_context.reshape(-1)[local.reshape(-1)].view_as(local).t()  # [s_local, b]
    return VisualInputs(
        pixel_values=pixel_values.index_select(0, plan.units.to(pixel_values.device)).to(device),
        send_index=plan.send_index.to(device), send_splits=plan.send_splits,
        recv_splits=plan.recv_splits, context_rows=plan.context_rows.to(device),
        context_mask=mask.contiguous().to(device), units_per_rank=plan.units_per_rank)


def build_model_inputs(batch: PackedBatch, *, groups: Optional["ParallelGroups"],
                       backend: Backend, context_token_ids: Sequence[int], tokens_per_tile: int,
                       with_labels: bool = True) -> ModelInputs:
    """Turn a host `PackedBatch` into this rank's `ModelInputs` (see the module doc).

    `groups`: the run's `ParallelGroups` (None: one process); under context parallelism
    (`groups.cp_size > 1`) the inputs are this rank's zigzag shard, every packed sample (reset
    mode) or row (joint mode) cut into 2 * cp chunks, and the attention parameters are those of
    the ring (`parallel.ring_attention.RingAttentionParams`). Every rank of the CP group passes
    the same batch. `context_token_ids`: the tokenizer's visual context ids; `tokens_per_tile`:
    context tokens per tile/frame (`ModelConfig.tokens_per_tile`). `with_labels=False` leaves
    labels out (inference: the batch's labels are ignored).
    """
    tokens = batch.tokens
    if tokens.dim() != 2:
        raise ValueError(f"batch.tokens must be [b, s], got shape {tuple(tokens.shape)}")
    b, s = tokens.shape
    device = backend.device()
    cu_host = None if batch.cu_seqlens is None else [int(c) for c in batch.cu_seqlens.tolist()]
    # shift BEFORE the split: a shard's last row predicts a token another rank holds
    labels = shift_labels(batch.labels, cu_host) if with_labels else None
    pixels = batch.pixel_values if batch.pixel_values is not None and \
        batch.pixel_values.numel() else None
    cp_size = 1 if groups is None else groups.cp_size
    rope_seq_len = int(batch.position_ids.max()) + 1 if batch.position_ids.numel() else None
    if cp_size == 1:
        visual = _visual_inputs(tokens, pixels, [torch.arange(b * s).view(b, s)], 0,
                                context_token_ids, tokens_per_tile, device)
        return ModelInputs(
            tokens=tokens.to(device), position_ids=batch.position_ids.to(device),
            labels=None if labels is None else labels.to(device),
            attention=None if cu_host is None else packed_attention_params(cu_host, device),
            visual=visual, rope_seq_len=rope_seq_len)
    cp_rank = groups.cp_rank
    mine = ZigzagShard.build(b, s, cp_size, cp_rank, cu_host)
    index = mine.index()
    # with media, every rank plans every rank's shard: the visual plan needs to know who holds
    # which context row (without media only the context-token count is checked)
    shard_positions = [] if pixels is None else [
        (mine if rank == cp_rank else ZigzagShard.build(b, s, cp_size, rank, cu_host))
        .index().view(b, s // cp_size) for rank in range(cp_size)]
    visual = _visual_inputs(tokens, pixels, shard_positions, cp_rank, context_token_ids,
                            tokens_per_tile, device)
    return ModelInputs(
        tokens=mine.shard(tokens, index).to(device),
        position_ids=mine.shard(batch.position_ids, index).to(device),
        labels=None if labels is None else mine.shard(labels, index).to(device),
        attention=RingAttentionParams.from_shard(mine, packed=cu_host is not None,
                                                 device=device),
        visual=visual, cp_rank=cp_rank, cp_size=cp_size, rope_seq_len=rope_seq_len)


def batch_from_tensors(input_ids: torch.Tensor, position_ids: torch.Tensor,
                       pixel_values: Optional[torch.Tensor] = None,
                       labels: Optional[torch.Tensor] = None,
                       cu_seqlens: Optional[torch.Tensor] = None) -> PackedBatch:
    """A `PackedBatch` from loose tensors (inference and tests); labels UNSHIFTED or None.
    Token-shaped tensors are brought to the host, where `build_model_inputs` plans the batch;
    pixels stay where they are."""
    input_ids = input_ids.detach().cpu()
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
    if pixel_values is None:
        pixel_values = torch.zeros(0, 3, 1, 1)
    return PackedBatch(tokens=input_ids, labels=labels.detach().cpu(),
                       position_ids=position_ids.detach().cpu(),
                       pixel_values=pixel_values,
                       cu_seqlens=None if cu_seqlens is None else cu_seqlens.detach().cpu())
