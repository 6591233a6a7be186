"""build_model_inputs on the host (no processes: a CP rank is just `cp_rank` / `cp_size`):
labels are shifted once per packed sample BEFORE the zigzag split, the shards reassemble to the
whole batch, attention parameters match the mode, and the visual checks refuse a batch whose
context tokens and pixels disagree - with and without media, at CP 1 and CP 2."""
from types import SimpleNamespace

import pytest
import torch

from backends import get_backend
from backends.attention_params import AttentionParams
from mindspeed_vita.data.types import IGNORE_INDEX, PackedBatch
from mindspeed_vita.errors import UserInputError
from mindspeed_vita.models.inputs import build_model_inputs, shift_labels
from mindspeed_vita.parallel.ring_attention import RingAttentionParams
from mindspeed_vita.parallel.zigzag import ZigzagShard, zigzag_unshard

CONTEXT = 7
TPT = 4


def batch(mode, tiles=1):
    """One row of 16 tokens; reset mode: samples of 8 and 8; a tile at positions 2-5."""
    tokens = torch.arange(100, 116)[None]
    tokens[0, 2:2 + TPT * tiles] = CONTEXT
    labels = torch.arange(200, 216)[None]
    cu = torch.tensor([0, 8, 16], dtype=torch.int32) if mode == "reset" else None
    positions = torch.cat([torch.arange(8), torch.arange(8)]) if cu is not None else \
        torch.arange(16)
    return PackedBatch(tokens=tokens, labels=labels, position_ids=positions[None],
                       pixel_values=torch.zeros(tiles, 3, 56, 56), cu_seqlens=cu)


def build(b, cp_rank=0, cp_size=1, **kw):
    groups = SimpleNamespace(cp_rank=cp_rank, cp_size=cp_size)
    return build_model_inputs(b, groups=groups, backend=get_backend("cpu"),
                              context_token_ids=[CONTEXT], tokens_per_tile=TPT, **kw)


def test_reset_mode_shift_ignores_the_last_row_of_every_sample():
    shifted = shift_labels(batch("reset").labels, [0, 8, 16])
    assert shifted[0, 6].item() == 207 and shifted[0, 7].item() == IGNORE_INDEX
    assert shifted[0, 8].item() == 209 and shifted[0, 15].item() == IGNORE_INDEX


@pytest.mark.parametrize("mode", ["reset", "joint"])
def test_cp1_inputs_are_the_whole_batch(mode):
    b = batch(mode)
    inputs = build(b)
    cu = None if b.cu_seqlens is None else b.cu_seqlens.tolist()
    assert torch.equal(inputs.tokens, b.tokens)
    assert torch.equal(inputs.labels, shift_labels(b.labels, cu))
    if mode == "reset":
        assert isinstance(inputs.attention, AttentionParams)
        assert inputs.attention.cu_seqlens_q_host == (0, 8, 16)
        assert inputs.attention.max_seqlen_q == 8
    else:
        assert inputs.attention is None
    assert inputs.visual.context_rows.tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("media", [True, False])
@pytest.mark.parametrize("mode", ["reset", "joint"])
def test_cp2_shards_are_split_after_the_shift(mode, media):
    b = batch(mode, tiles=1 if media else 0)
    if not media:
        b.tokens[b.tokens == CONTEXT] = 1
    cu = None if b.cu_seqlens is None else b.cu_seqlens.tolist()
    shards = [build(b, rank, 2) for rank in range(2)]
    plans = [ZigzagShard.build(1, 16, 2, rank, cu) for rank in range(2)]
    for name in ("tokens", "position_ids"):
        whole = zigzag_unshard([getattr(x, name) for x in shards], plans)
        assert torch.equal(whole, getattr(b, name)), name
    # shifted once on the whole batch: a shard's last row predicts a token the other rank holds
    whole_labels = zigzag_unshard([x.labels for x in shards], plans)
    assert torch.equal(whole_labels, shift_labels(b.labels, cu))
    for x in shards:
        # dynamic-NTK RoPE scales by the whole batch's length on every rank
        assert x.rope_seq_len == (8 if mode == "reset" else 16)
        assert isinstance(x.attention, RingAttentionParams)
        assert x.attention.is_packed == (mode == "reset")
        assert (x.visual is not None) == media
    if media:
        assert sorted(x.visual.pixel_values.shape[0] for x in shards) == [0, 1]


@pytest.mark.parametrize("cp_size", [1, 2])
def test_context_tokens_and_pixels_must_agree(cp_size):
    b = batch("joint", tiles=1)
    b.pixel_values = torch.zeros(2, 3, 56, 56)
    with pytest.raises(UserInputError, match="4 visual context tokens.*2 tiles"):
        build(b, 0, cp_size)
    b.pixel_values = torch.zeros(0, 3, 56, 56)
    with pytest.raises(UserInputError, match="4 visual context tokens"):
        build(b, 0, cp_size)
