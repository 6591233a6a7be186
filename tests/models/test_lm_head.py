"""The three LM heads against a plain-PyTorch cross entropy, single process and TP=2 (gloo).

The batch has several supervised spans, one of which starts right after a block of image-context
tokens, and trailing -100 padding; the chunk size does not divide the row count.
"""
import pytest
import torch
import torch.nn.functional as F

from backends import get_backend
from mindspeed_vita.models.lm_head import (
    IGNORE_INDEX, ChunkedHead, FullHead, LogitsMaskedHead, build_lm_head)
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel
from tests.dist_utils import run_distributed

SEQ, BATCH, HIDDEN, VOCAB = 24, 2, 16, 64
IMAGE_BLOCK = range(8, 13)  # image-context token positions in batch element 0
CHUNK = 5  # does not divide SEQ * BATCH = 48


def heads(groups=None):
    # the masked head both plain and chunked (24 selected rows > CHUNK: the chunked path runs)
    return [FullHead(groups=groups), ChunkedHead(CHUNK, groups=groups),
            LogitsMaskedHead(groups=groups), LogitsMaskedHead(chunk_size=CHUNK, groups=groups)]


def head_id(head):
    chunked_mask = isinstance(head, LogitsMaskedHead) and head.chunk_size is not None
    return head.name + ("-chunked" if chunked_mask else "")


def token_aligned_labels():
    """Labels as the chat template renders them, aligned with the tokens (not yet shifted):
    token j is supervised when it belongs to an assistant answer."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    aligned = torch.full((BATCH, SEQ), IGNORE_INDEX)
    # batch 0: prompt 0-2, answer 3-6, user turn 7 + image block 8-12, answer 13-17, prompt, answer
    # 21-23 at the very end.
    for start, stop in ((3, 7), (13, 18), (21, 24)):
        aligned[0, start:stop] = tokens[0, start:stop]
    # batch 1: one answer 4-15, then -100 padding 16-23.
    aligned[1, 4:16] = tokens[1, 4:16]
    return aligned


def shift(aligned):
    """labels[b, i] = the token row i predicts = aligned[b, i + 1]; the last row predicts none."""
    out = torch.full_like(aligned, IGNORE_INDEX)
    out[:, :-1] = aligned[:, 1:]
    return out


def make_batch(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).to(dtype)
    return hidden, weight, shift(token_aligned_labels())


def reference(hidden, weight, labels):
    """Plain PyTorch: full logits in the compute dtype, fp32 cross entropy, summed."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logits = F.linear(hidden, weight).float()  # [s, b, v]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.t().reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()
    return loss.detach(), (labels != IGNORE_INDEX).sum(), hidden.grad, weight.grad


def run_head(head, hidden, weight, labels, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss, count = head.loss(hidden, weight, labels, **kwargs)
    loss.backward()
    return loss.detach(), count, hidden.grad, weight.grad


@pytest.fixture(scope="module")
def tp1():
    """A 1-rank world with megatron's parallel state (TP = 1), torn down after the module."""
    yield initialize_parallel(get_backend("cpu"), ParallelLayout())
    destroy_parallel()


# ------------------------------------------------------------------ single process, TP = 1
def test_labels_fixture_has_span_right_after_image_block():
    labels = shift(token_aligned_labels())
    last_image_row = IMAGE_BLOCK[-1]
    assert labels[0, last_image_row] != IGNORE_INDEX  # it predicts the answer's first token
    assert (labels[0, IMAGE_BLOCK[0]:last_image_row] == IGNORE_INDEX).all()
    assert (labels[1, 15:] == IGNORE_INDEX).all()  # padding


@pytest.mark.parametrize("head", heads(), ids=head_id)
def test_fp32_heads_match_reference(tp1, head):
    hidden, weight, labels = make_batch()
    ref_loss, ref_count, ref_dh, ref_dw = reference(hidden, weight, labels)
    loss, count, dh, dw = run_head(head, hidden, weight, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert count.dtype == torch.int64 and int(count) == int(ref_count) == 24
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", heads(), ids=head_id)
def test_bf16_heads_match_reference(tp1, head):
    """bf16 hidden/weight: the head and the reference share the bf16 matmul and the fp32
    cross entropy. Tolerance: loss 1e-4 relative; gradients (bf16) 2e-2 relative + 1e-3
    absolute, which covers bf16 rounding of the gradient matmuls and the chunked head's fp32
    accumulation of the weight gradient."""
    hidden, weight, labels = make_batch(torch.bfloat16)
    ref_loss, _, ref_dh, ref_dw = reference(hidden, weight, labels)
    loss, _, dh, dw = run_head(head, hidden, weight, labels)
    assert dh.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dh.float(), ref_dh.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(dw.float(), ref_dw.float(), rtol=2e-2, atol=1e-3)


def test_logits_masked_head_keeps_first_token_of_every_answer(tp1):
    """Row i predicts labels[i]: the rows kept include the one before each answer's first token
    (for the second answer that is the last image-context row). The release's defect - using
    the token-aligned label mask as the row mask - drops those rows and changes the loss."""
    aligned = token_aligned_labels()
    labels = shift(aligned)
    rows = set(LogitsMaskedHead.supervised_rows(labels).tolist())
    for b in range(BATCH):
        is_answer = aligned[b] != IGNORE_INDEX
        starts = [j for j in range(1, SEQ) if is_answer[j] and not is_answer[j - 1]]
        for j in starts:
            assert (j - 1) * BATCH + b in rows, f"row predicting first answer token {b},{j}"
    assert (IMAGE_BLOCK[-1]) * BATCH + 0 in rows

    hidden, weight, _ = make_batch()
    ref_loss = reference(hidden, weight, labels)[0]
    loss, count = LogitsMaskedHead().loss(hidden, weight, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert int(count) == int((aligned != IGNORE_INDEX).sum())

    # The defective selection (token-aligned mask as rows, targets from the shifted labels).
    defect_rows = (aligned.t().reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden.reshape(SEQ * BATCH, HIDDEN)
    targets = labels.t().reshape(-1)[defect_rows]
    defect_loss = F.cross_entropy(F.linear(flat[defect_rows], weight), targets,
                                  ignore_index=IGNORE_INDEX, reduction="sum")
    assert (targets != IGNORE_INDEX).sum() < count  # first tokens lost
    assert not torch.allclose(defect_loss, ref_loss, rtol=1e-3)


@pytest.mark.parametrize("head", heads(), ids=head_id)
def test_all_ignored_labels_give_zero_without_nan(tp1, head):
    hidden, weight, labels = make_batch()
    labels = torch.full_like(labels, IGNORE_INDEX)
    loss, count, dh, dw = run_head(head, hidden, weight, labels)
    assert float(loss) == 0.0 and int(count) == 0
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert float(dh.abs().sum()) == 0.0 and float(dw.abs().sum()) == 0.0


@pytest.mark.parametrize("head", heads(), ids=head_id)
def test_frozen_weight_and_no_grad(tp1, head):
    """Stage 1 freezes the LLM (output layer included) but needs the hidden gradient; eval runs
    under no_grad."""
    hidden, weight, labels = make_batch()
    ref_loss, _, ref_dh, _ = reference(hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    loss, _ = head.loss(h, weight, labels)
    loss.backward()
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        loss, _ = head.loss(hidden, weight, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", heads(), ids=head_id)
def test_logits_for_rows_and_last_row(tp1, head):
    hidden, weight, _ = make_batch()
    full = F.linear(hidden, weight).reshape(SEQ * BATCH, VOCAB)
    rows = torch.tensor([47, 3, 11, 3, 0, 20])  # unsorted, repeated, across chunks
    torch.testing.assert_close(head.logits_for_rows(hidden, weight, rows), full[rows],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.last_row_logits(hidden, weight),
                               F.linear(hidden[-1], weight), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"row indices must lie in \[0, 48\)"):
        head.logits_for_rows(hidden, weight, torch.tensor([48]))


def test_chunked_head_keeps_one_chunk_of_logits(tp1):
    """Forward + backward peak memory (the backend's measurement: peak RSS growth on CPU) and
    the bytes saved for backward: the full head holds all logits, the chunked head about one
    chunk of them plus the gradient buffers."""
    from mindspeed_vita.bench.common import measure, saved_tensor_bytes

    backend = get_backend("cpu")
    rows, hidden_size, vocab, chunk = 4096, 32, 4096, 256
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, 1, hidden_size, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (1, rows), generator=gen)
    logits_bytes = rows * vocab * 4

    def step(head):
        def fwd_bwd():
            hidden.grad = weight.grad = None
            head.loss(hidden, weight, labels)[0].backward()
        return fwd_bwd

    full_peak = measure(step(FullHead()), backend, repeats=1, warmup=1)["peak_bytes"]
    chunked_peak = measure(step(ChunkedHead(chunk)), backend, repeats=1, warmup=1)["peak_bytes"]
    assert full_peak >= 0.9 * logits_bytes, (full_peak, logits_bytes)
    assert chunked_peak < 0.25 * logits_bytes, (chunked_peak, logits_bytes)

    full_saved = saved_tensor_bytes(lambda: FullHead().loss(hidden, weight, labels))
    chunked_saved = saved_tensor_bytes(lambda: ChunkedHead(chunk).loss(hidden, weight, labels))
    assert full_saved >= logits_bytes
    gradient_buffers = hidden.numel() * 4 + weight.numel() * 4
    assert chunked_saved <= gradient_buffers + rows * 8  # + the int64 targets

    # every row supervised: the masked head selects them all; chunked, it stays at one chunk
    masked_peak = measure(step(LogitsMaskedHead(chunk_size=chunk)), backend, repeats=1,
                          warmup=1)["peak_bytes"]
    assert masked_peak < 0.25 * logits_bytes, (masked_peak, logits_bytes)
    plain_masked_saved = saved_tensor_bytes(lambda: LogitsMaskedHead().loss(hidden, weight,
                                                                            labels))
    assert plain_masked_saved >= logits_bytes  # without chunks it holds every selected logit


def test_bad_input_errors(tp1):
    hidden, weight, labels = make_batch()
    bad = labels.clone()
    bad[0, 3] = VOCAB
    with pytest.raises(ValueError, match=f"label id {VOCAB} is outside the vocabulary"):
        FullHead().loss(hidden, weight, bad)
    with pytest.raises(ValueError, match=r"labels must be \[b, s\]"):
        FullHead().loss(hidden, weight, labels.t())
    with pytest.raises(ValueError, match="weight must be"):
        FullHead().loss(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="model.lm_head: unknown head 'fast'"):
        build_lm_head("fast")
    with pytest.raises(ValueError, match="lm_head_chunk_size must be positive"):
        build_lm_head("chunked", 0)
    assert [type(build_lm_head(n, 8)) for n in ("full", "chunked", "logits-masked")] == [
        FullHead, ChunkedHead, LogitsMaskedHead]
    assert build_lm_head("chunked", 8).chunk_size == 8


# ------------------------------------------------------------------------- TP = 2 (gloo)
def _tp2_groups(rank, world_size):
    """ParallelGroups of a TP-2 world built by hand, without megatron's parallel_state: the
    heads must take their group from here (megatron's global state is not even set up)."""
    import torch.distributed as dist

    from mindspeed_vita.parallel.groups import ParallelGroups

    alone = [dist.new_group([r]) for r in range(world_size)][rank]
    return ParallelGroups(layout=ParallelLayout(tp=world_size), rank=rank, tp=dist.group.WORLD,
                          cp=alone, dp=alone, dp_cp=alone, pp=alone,
                          tp_ranks=tuple(range(world_size)), cp_ranks=(rank,),
                          dp_ranks=(rank,), dp_cp_ranks=(rank,), pp_ranks=(rank,))


def _tp2_body(rank, world_size):
    from megatron.core import parallel_state

    get_backend("cpu").adapt_megatron()  # megatron's TP mappings allocate on the "cuda" device
    groups = _tp2_groups(rank, world_size)
    assert not parallel_state.model_parallel_is_initialized()
    hidden, weight, labels = make_batch()
    v_local, s_local = VOCAB // world_size, SEQ // world_size
    weight_shard = weight[rank * v_local:(rank + 1) * v_local]
    results = {}
    for head in heads(groups):
        for sp in (False, True):
            local_hidden = hidden[rank * s_local:(rank + 1) * s_local] if sp else hidden
            loss, count, dh, dw = run_head(head, local_hidden, weight_shard, labels,
                                           sequence_parallel=sp)
            rows = torch.tensor([47, 3, 26])
            with torch.no_grad():
                picked = head.logits_for_rows(local_hidden, weight_shard, rows,
                                              sequence_parallel=sp)
                last = head.last_row_logits(local_hidden, weight_shard, sequence_parallel=sp)
            results[(head.name, sp)] = (loss, count, dh, dw, picked, last)
    return results


def test_tensor_parallel_2_matches_single_process():
    hidden, weight, labels = make_batch()
    ref_loss, ref_count, ref_dh, ref_dw = reference(hidden, weight, labels)
    full_logits = F.linear(hidden, weight).reshape(SEQ * BATCH, VOCAB)
    per_rank = run_distributed(_tp2_body, world_size=2)
    for key in per_rank[0]:
        name, sp = key
        (loss0, count0, dh0, dw0, pick0, last0), (loss1, count1, dh1, dw1, pick1, last1) = (
            per_rank[0][key], per_rank[1][key])
        for loss, count in ((loss0, count0), (loss1, count1)):
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, msg=str(key))
            assert int(count) == int(ref_count), key
        torch.testing.assert_close(torch.cat([dw0, dw1]), ref_dw, rtol=1e-5, atol=1e-5,
                                   msg=str(key))
        if sp:  # each rank holds the gradient of its own sequence shard
            torch.testing.assert_close(torch.cat([dh0, dh1]), ref_dh, rtol=1e-5, atol=1e-5,
                                       msg=str(key))
        else:  # the hidden gradient is summed over the vocabulary shards on every rank
            torch.testing.assert_close(dh0, ref_dh, rtol=1e-5, atol=1e-5, msg=str(key))
            torch.testing.assert_close(dh1, ref_dh, rtol=1e-5, atol=1e-5, msg=str(key))
        torch.testing.assert_close(torch.cat([pick0, pick1], dim=1),
                                   full_logits[torch.tensor([47, 3, 26])], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([last0, last1], dim=1),
                                   F.linear(hidden[-1], weight), rtol=1e-5, atol=1e-5)
