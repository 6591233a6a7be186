"""The composed Long-VITA model: InternViT -> pixel shuffle + MLP -> Qwen2 decoder -> LM head.

Visual features overwrite the embedding rows of the context tokens (`<IMG_CONTEXT>`,
`<PATCH_CONTEXT>`, `<VID_CONTEXT>`), in order: the i-th context token of the batch (row-major
over [b, s]) receives the i-th feature row of the projected tiles/frames, so the data pipeline
must order `pixel_values` as the context spans appear (it does: `RenderedSample`). Positions
come in with the batch, so packed (reset) and sharded batches work unchanged.

State-dict names: `vision.*` (see models.vision), `projector.*` (models.projector),
`language.*` (models.language, megatron GPTModel names).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams

from backends.base import Backend
from mindspeed_vita.config.model import ModelConfig
from mindspeed_vita.data.types import IGNORE_INDEX
from mindspeed_vita.errors import UserInputError
from mindspeed_vita.models.language import Qwen2LanguageModel
from mindspeed_vita.models.lm_head import build_lm_head
from mindspeed_vita.models.projector import VisionProjector
from mindspeed_vita.models.vision import InternViT
from mindspeed_vita.parallel.groups import ParallelGroups


def shift_labels(labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unshifted labels `[b, s]` (labels[i] = target AT i) -> shifted (target PREDICTED by row i).

    Row i predicts labels[i + 1]; the last row of each row and, in reset-mode packing, the last
    row of every packed sample (which would otherwise predict the next sample's first token)
    get IGNORE_INDEX. Must run BEFORE any context-parallel split.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        ends = cu_seqlens[1:-1].long() - 1  # last token of each sample, flattened over [b, s]
        flat = shifted.view(-1)
        flat[ends[(ends >= 0) & (ends < flat.numel())]] = IGNORE_INDEX
    return shifted


def packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """megatron PackedSeqParams (THD) for cumulative lengths with a leading 0."""
    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


class LongVitaModel(torch.nn.Module):
    """InternViT + projector + Qwen2 decoder + LM head.

    `context_token_ids`: token ids whose embedding rows receive visual features (from the
    tokenizer). `groups`: the `ParallelGroups` from `parallel.process_groups.initialize_parallel`
    (tensor-parallel split, sequence parallelism via `groups.layout`).
    `recompute`: "none" | "vision" (ViT + projector) | "full" (ViT, projector and every decoder
    layer).
    """

    def __init__(self, cfg: ModelConfig, backend: Backend, *, groups: ParallelGroups,
                 context_token_ids: Sequence[int], recompute: str = "none"):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.groups = groups
        self.sequence_parallel = groups.sequence_parallel
        dtype = getattr(torch, cfg.params_dtype)
        device = backend.device()
        recompute_visual = recompute in ("vision", "full")
        self.vision = InternViT(cfg.vision, backend, recompute=recompute_visual).to(
            device=device, dtype=dtype)
        self.projector = VisionProjector(cfg.projector, cfg.vision.hidden_size,
                                         cfg.language.hidden_size, recompute=recompute_visual
                                         ).to(device=device, dtype=dtype)
        self.language = Qwen2LanguageModel(cfg.language, backend, dtype, groups=groups,
                                           recompute=recompute == "full")
        # the real vocabulary size: the head masks the TP padding ids out of loss and logits
        self.head = build_lm_head(cfg.lm_head, cfg.lm_head_chunk_size,
                                  vocab_size=cfg.language.vocab_size)
        self.register_buffer("context_token_ids",
                             torch.tensor(sorted(set(int(i) for i in context_token_ids)),
                                          dtype=torch.long, device=device), persistent=False)

    # ----------------------------------------------------------------- visual
    def encode_visual(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles/frames `[n, 3, H, W]` -> feature rows `[n * tokens_per_tile, h_llm]`."""
        features = self.projector(self.vision(pixel_values))
        return features.reshape(-1, features.shape[-1])

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
        """Text embeddings `[s, b, h]` (this rank's `[s/tp, b, h]` under sequence parallel) with
        visual features written into the context-token rows."""
        embeddings = self.language.embed(input_ids)
        is_context = torch.isin(input_ids, self.context_token_ids)  # [b, s]
        n_context = int(is_context.sum())
        n_visual = 0 if pixel_values is None else pixel_values.shape[0] * self.cfg.tokens_per_tile
        if n_context != n_visual:
            raise UserInputError(
                f"the batch has {n_context} visual context tokens but its pixel_values give "
                f"{n_visual} feature rows ({0 if pixel_values is None else pixel_values.shape[0]} "
                f"tiles/frames x {self.cfg.tokens_per_tile}); prompt tags and images disagree")
        if n_context == 0:
            return embeddings
        features = self.encode_visual(pixel_values).to(embeddings.dtype)
        # index of each context token's feature row, row-major over [b, s]
        order = (is_context.reshape(-1).cumsum(0) - 1).view_as(is_context)
        mask = is_context.t()  # [s, b], the layout of the embeddings
        rows = features.index_select(0, order.t()[mask])  # sequence-major, as mask selects
        if not self.sequence_parallel:
            out = embeddings.clone()
            out[mask] = rows
            return out
        # Sequence parallel: every TP rank encodes all tiles, but holds only its slice of the
        # sequence. Write the features into a full [s, b, h] tensor and scatter it like the
        # text embeddings: the scatter's backward all-gathers the gradient, so every rank's
        # vision tower and projector get the gradient of ALL feature rows (the same full
        # gradient on every TP rank, as at TP=1), not just that of its own slice.
        visual = features.new_zeros(mask.shape + (features.shape[-1],))
        visual[mask] = rows
        visual = tensor_parallel.scatter_to_sequence_parallel_region(visual, group=self.groups.tp)
        s_local = embeddings.shape[0]
        start = self.groups.tp_rank * s_local
        local_mask = mask[start:start + s_local].unsqueeze(-1)  # [s/tp, b, 1]
        return torch.where(local_mask, visual, embeddings)

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                pixel_values: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None):
        """Training/eval forward.

        input_ids, position_ids `[b, s]`; labels `[b, s]` UNSHIFTED (as in PackedBatch) or None;
        cu_seqlens (int32, leading 0, over the flattened b*s tokens) for reset-mode packing.
        Returns `(loss_sum, num_label_tokens)` when labels are given, else final hidden
        states `[s, b, h]`.
        """
        decoder_input = self.embed(input_ids, pixel_values)
        params = packed_seq_params(cu_seqlens) if cu_seqlens is not None else None
        hidden = self.language(decoder_input, position_ids, params)
        if labels is None:
            return hidden
        shifted = shift_labels(labels, cu_seqlens)
        return self.head.loss(hidden, self.language.output_weight, shifted,
                              sequence_parallel=self.sequence_parallel)

    def gather_vocab(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Local vocabulary shards `[..., V_pad/tp]` -> full logits `[..., vocab_size]`."""
        full = tensor_parallel.gather_from_tensor_model_parallel_region(local_logits,
                                                                 group=self.groups.tp)
        return full[..., : self.cfg.language.vocab_size]

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
               pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-vocabulary logits `[b, s, vocab]` (parity checks and small inputs)."""
        hidden = self.forward(input_ids, position_ids, pixel_values)
        b, s = input_ids.shape
        rows = torch.arange(s * b, device=hidden.device)
        local = self.head.logits_for_rows(hidden, self.language.output_weight, rows,
                                          sequence_parallel=self.sequence_parallel)
        return self.gather_vocab(local).view(s, b, -1).transpose(0, 1)

    def last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits `[b, vocab]` of the last position only (decoding)."""
        local = self.head.last_row_logits(hidden, self.language.output_weight,
                                          sequence_parallel=self.sequence_parallel)
        return self.gather_vocab(local)

    def trainable_groups(self) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """(vision, projector, language): the units `training.trainable` freezes or trains."""
        return self.vision, self.projector, self.language
