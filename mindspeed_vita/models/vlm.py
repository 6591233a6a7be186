"""The composed Long-VITA model: InternViT -> pixel shuffle + MLP -> Qwen2 decoder -> LM head.

Visual features overwrite the embedding rows of the context tokens (`<IMG_CONTEXT>`,
`<PATCH_CONTEXT>`, `<VID_CONTEXT>`), in order: the i-th context token of the batch (row-major
over [b, s]) receives the i-th feature row of the projected tiles/frames, so the data pipeline
must order `pixel_values` as the context spans appear (it does: `RenderedSample`). Where each
row goes, which tiles this rank encodes, shifted labels and attention boundaries are planned
once per batch by `models.inputs.build_model_inputs`; the model takes that `ModelInputs`:
`forward(inputs)` returns this rank's `LossTerms`, `hidden_states(inputs)` the final hidden.

State-dict names: `vision.*` (see models.vision), `projector.*` (models.projector),
`language.*` (models.language, megatron GPTModel names).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from megatron.core import tensor_parallel

from backends.base import Backend
from mindspeed_vita.config.model import ModelConfig
from mindspeed_vita.data.types import PackedBatch
from mindspeed_vita.models.inputs import (
    ModelInputs, VisualInputs, batch_from_tensors, build_model_inputs)
from mindspeed_vita.models.language import Qwen2LanguageModel
from mindspeed_vita.models.lm_head import build_lm_head
from mindspeed_vita.models.loss import LossTerms
from mindspeed_vita.models.projector import VisionProjector
from mindspeed_vita.models.vision import InternViT
from mindspeed_vita.parallel.groups import ParallelGroups
from mindspeed_vita.parallel.visual_exchange import exchange_feature_rows


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
                                  vocab_size=cfg.language.vocab_size, groups=groups)
        #: visual context ids on the host: `build_inputs` plans the batch there
        self.context_ids = tuple(sorted(set(int(i) for i in context_token_ids)))
        #: context-parallel group the visual feature rows are exchanged over (None: CP 1)
        self.cp_group = groups.cp if groups.cp_size > 1 else None

    # ----------------------------------------------------------------- inputs
    def build_inputs(self, batch: PackedBatch, *, with_labels: bool = True) -> ModelInputs:
        """`build_model_inputs` with this model's groups, backend, context tokens and tile size:
        under context parallelism, this rank's zigzag shard of `batch`."""
        return build_model_inputs(batch, groups=self.groups, backend=self.backend,
                                  context_token_ids=self.context_ids,
                                  tokens_per_tile=self.cfg.tokens_per_tile,
                                  with_labels=with_labels)

    # ----------------------------------------------------------------- visual
    def encode_visual(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles/frames `[n, 3, H, W]` -> feature rows `[n * tokens_per_tile, h_llm]`."""
        features = self.projector(self.vision(pixel_values))
        return features.reshape(-1, features.shape[-1])

    def visual_rows(self, visual: VisualInputs) -> torch.Tensor:
        """Feature rows of this rank's context tokens `[n_rows, h_llm]`, in the order of
        `visual.context_rows`: this rank encodes its own units, then the rows move to the
        ranks whose slices hold their context tokens (nothing moves at CP 1)."""
        features = self.encode_visual(visual.pixel_values)
        return exchange_feature_rows(features, visual.send_index, visual.send_splits,
                                     visual.recv_splits, self.cp_group)

    def embed(self, inputs: ModelInputs) -> torch.Tensor:
        """Text embeddings `[s, b, h]` of the local tokens (this rank's `[s/tp, b, h]` under
        sequence parallel) with visual features written into the context-token rows."""
        embeddings = self.language.embed(inputs.tokens)
        if inputs.visual is None:
            return embeddings
        visual = inputs.visual
        rows = self.visual_rows(visual).to(embeddings.dtype)
        s_local, b = visual.context_mask.shape
        h = embeddings.shape[-1]
        if not self.sequence_parallel:
            flat = embeddings.reshape(s_local * b, h).index_copy(0, visual.context_rows, rows)
            return flat.view(s_local, b, h)
        # Sequence parallel: every TP rank encodes the same units (the vision tower is
        # replicated over TP), but holds only its slice of the sequence. Write the features into
        # a full [s, b, h] tensor and scatter it like the text embeddings: the scatter's backward
        # all-gathers the gradient, so every rank's vision tower and projector get the gradient
        # of ALL feature rows (the same full gradient on every TP rank, as at TP=1), not just
        # that of its own slice.
        full = rows.new_zeros(s_local * b, h).index_copy(0, visual.context_rows, rows)
        full = tensor_parallel.scatter_to_sequence_parallel_region(
            full.view(s_local, b, h), group=self.groups.tp)
        s_tp = embeddings.shape[0]
        start = self.groups.tp_rank * s_tp
        local_mask = visual.context_mask[start:start + s_tp].unsqueeze(-1)  # [s/tp, b, 1]
        return torch.where(local_mask, full, embeddings)

    # ---------------------------------------------------------------- forward
    def hidden_states(self, inputs: ModelInputs) -> torch.Tensor:
        """Final-normed decoder output `[s_local, b, h]` (`[s_local/tp, b, h]` under sequence
        parallel) of this rank's tokens."""
        return self.language(self.embed(inputs), inputs.position_ids, inputs.attention,
                             rope_seq_len=inputs.rope_seq_len)

    def forward(self, inputs: ModelInputs) -> LossTerms:
        """Training/eval forward: this rank's `LossTerms` (loss sum over its label rows and their
        count). Reduce over dp x cp with `models.loss.reduce_loss`; labels come shifted in
        `inputs` (the model never shifts labels)."""
        if inputs.labels is None:
            raise ValueError("LongVitaModel.forward needs inputs with labels "
                             "(build_model_inputs(..., with_labels=True)); use hidden_states() "
                             "for the final hidden states")
        hidden = self.hidden_states(inputs)
        loss_sum, num_tokens = self.head.loss(hidden, self.language.output_weight, inputs.labels,
                                              sequence_parallel=self.sequence_parallel)
        return LossTerms(loss_sum, num_tokens)

    def gather_vocab(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Local vocabulary shards `[..., V_pad/tp]` -> full logits `[..., vocab_size]`."""
        full = tensor_parallel.gather_from_tensor_model_parallel_region(local_logits,
                                                                 group=self.groups.tp)
        return full[..., : self.cfg.language.vocab_size]

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
               pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-vocabulary logits `[b, s, vocab]` of a whole (unsharded) batch: parity checks
        and small inputs, at CP 1 (under context parallelism each rank holds only its shard's
        hidden states; logits of a shard come from `hidden_states` and the head)."""
        if self.cp_group is not None:
            raise ValueError("LongVitaModel.logits() returns the whole sequence's logits and "
                             "runs at context parallel size 1; under CP use hidden_states() on "
                             "this rank's shard")
        inputs = self.build_inputs(batch_from_tensors(input_ids, position_ids, pixel_values),
                                   with_labels=False)
        hidden = self.hidden_states(inputs)
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

    # -------------------------------------------------------------- inference
    def predicting_logits(self, hidden: torch.Tensor, inputs: ModelInputs,
                          predict_position: int) -> torch.Tensor:
        """Full-vocabulary logits `[b, vocab]` of the row at global position `predict_position`
        (every batch row has it), through this model's head: the logits-masked head projects
        that row only, the chunked / full heads project the local sequence and keep it. Under
        CP only the rank whose shard holds the row projects; the CP group then sums, so every
        rank gets the same logits."""
        if self.sequence_parallel:
            raise ValueError("inference runs without sequence parallel (parallel."
                             "sequence_parallel: false): one new token cannot be split over tp")
        b = hidden.shape[1]
        # one host read per prefill: where (if here) the predicting position is
        local = (inputs.position_ids[0] == predict_position).nonzero().flatten().tolist()
        logits = hidden.new_zeros(b, self.cfg.language.vocab_size)
        if local:
            rows = torch.arange(b, device=hidden.device) + local[0] * b
            part = self.head.logits_for_rows(hidden, self.language.output_weight, rows)
            logits = self.gather_vocab(part)
        if self.cp_group is not None:
            # the other ranks add zeros: exact (gather_vocab dropped the -inf padding columns)
            torch.distributed.all_reduce(logits, group=self.cp_group)
        return logits

    def prefill(self, inputs: ModelInputs, cache, *, predict_position: int) -> torch.Tensor:
        """Run the prompt (`inputs` from `build_inputs(..., with_labels=False)`: this rank's
        zigzag shard under CP) through the model, store every layer's keys/values in `cache`
        (`inference.kv_cache.KVCache`, a `ShardedKVCache` under CP; None for a plain forward,
        the fixed-length decode mode) and return the logits `[b, vocab]` of the row at global
        position `predict_position` (the prompt's last token)."""
        hidden = self.language(self.embed(inputs), inputs.position_ids, inputs.attention,
                               inference=cache, rope_seq_len=predict_position + 1)
        if cache is not None:
            cache.advance()
        return self.predicting_logits(hidden, inputs, predict_position)

    def decode_step(self, tokens: torch.Tensor, position: int, cache) -> torch.Tensor:
        """One new token per row, `tokens [b, 1]` at global `position` (the same on every CP
        rank), against `cache`; returns the next-token logits `[b, vocab]` (identical on every
        CP rank: each step's attention merges every rank's cached keys)."""
        if self.sequence_parallel:
            raise ValueError("inference runs without sequence parallel (parallel."
                             "sequence_parallel: false): one new token cannot be split over tp")
        positions = torch.full_like(tokens, position)
        hidden = self.language(self.language.embed(tokens), positions, None, inference=cache,
                               rope_seq_len=position + 1)
        cache.advance()
        return self.last_logits(hidden)

    def trainable_groups(self) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """(vision, projector, language): the units `training.trainable` freezes or trains."""
        return self.vision, self.projector, self.language
