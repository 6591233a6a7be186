"""Padded vocabulary: the output layer has V_pad > vocab_size rows (padded for TP), and the rows
of the padding ids hold anything (zeros after an import, random after a fresh init). Every head
leaves those ids out: the loss and gradients equal a plain cross entropy over the REAL vocabulary
(fp64 reference), the padding rows get a zero (not NaN) gradient, and their logits are -inf.
Single process (V_pad = 64) and TP=2 in gloo (V_pad = 64: the second shard is part padding;
V_pad = 128: the second shard is all padding), and through LongVitaModel.
"""
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from backends import get_backend
from mindspeed_vita.models.inputs import batch_from_tensors
from mindspeed_vita.models.language import padded_vocab_size
from mindspeed_vita.models.lm_head import (
    IGNORE_INDEX, ChunkedHead, FullHead, LogitsMaskedHead, build_lm_head)
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel
from tests.dist_utils import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ, BATCH, HIDDEN, VOCAB = 12, 2, 16, 50
CHUNK = 5  # does not divide SEQ * BATCH
TOL = 1e-5
ROWS = torch.tensor([23, 0, 7, 7])


def heads(vocab_size=VOCAB, groups=None):
    return [FullHead(vocab_size, groups=groups), ChunkedHead(CHUNK, vocab_size, groups=groups),
            LogitsMaskedHead(vocab_size, groups=groups),
            LogitsMaskedHead(vocab_size, CHUNK, groups=groups)]


def head_id(head):
    chunked_mask = isinstance(head, LogitsMaskedHead) and head.chunk_size is not None
    return head.name + ("-chunked" if chunked_mask else "")


def make_batch(v_pad):
    """hidden [s, b, h], weight [v_pad, h] whose padding rows are large and nonzero, labels
    [b, s] (shifted) over the real vocabulary, including its last id, with ignored rows."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    weight = torch.randn(v_pad, HIDDEN, generator=gen) * 0.5
    weight[VOCAB:] = torch.randn(v_pad - VOCAB, HIDDEN, generator=gen) * 3.0
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[0, 0] = VOCAB - 1
    labels[0, 5:8] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    return hidden, weight, labels


def reference(hidden, weight, labels):
    """fp64 cross entropy over the real vocabulary (padding rows dropped): loss, d hidden,
    d weight (zero in the padding rows)."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logits = F.linear(h, w[:VOCAB])  # [s, b, VOCAB]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.t().reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()
    return loss.detach().float(), h.grad.float(), w.grad.float()


def run_head(head, hidden, weight, labels, **kwargs):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss, count = head.loss(hidden, weight, labels, **kwargs)
    loss.backward()
    return loss.detach(), count, hidden.grad, weight.grad


@pytest.fixture
def tp1():
    """The one-process groups (TP = 1)."""
    yield initialize_parallel(get_backend("cpu"), ParallelLayout())
    destroy_parallel()


# ------------------------------------------------------------------ single process, TP = 1
def test_padding_fixture():
    assert padded_vocab_size(VOCAB, 64, 1) == 64
    assert padded_vocab_size(VOCAB, 32, 2) == 64 and padded_vocab_size(VOCAB, 64, 2) == 128


@pytest.mark.parametrize("head", heads(), ids=lambda h: h.name)
def test_heads_leave_padding_ids_out(tp1, head):
    hidden, weight, labels = make_batch(padded_vocab_size(VOCAB, 64, 1))
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels)
    loss, count, dh, dw = run_head(head, hidden, weight, labels)
    assert int(count) == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL)
    torch.testing.assert_close(dh, ref_dh, rtol=TOL, atol=TOL)
    torch.testing.assert_close(dw, ref_dw, rtol=TOL, atol=TOL)
    assert torch.isfinite(dw).all() and float(dw[VOCAB:].abs().max()) == 0.0
    with torch.no_grad():
        picked = head.logits_for_rows(hidden, weight, ROWS)
        last = head.last_row_logits(hidden, weight)
    full = F.linear(hidden, weight).reshape(SEQ * BATCH, -1)
    torch.testing.assert_close(picked[:, :VOCAB], full[ROWS, :VOCAB], rtol=TOL, atol=TOL)
    torch.testing.assert_close(last[:, :VOCAB], F.linear(hidden[-1], weight[:VOCAB]),
                               rtol=TOL, atol=TOL)
    assert bool((picked[:, VOCAB:] == float("-inf")).all())
    assert bool((last[:, VOCAB:] == float("-inf")).all())


@pytest.mark.parametrize("name", ["full", "chunked", "logits-masked"])
def test_without_vocab_size_padding_ids_change_the_loss(tp1, name):
    """The defect the mask fixes: a head that does not know the real vocabulary size puts the
    padding logits into the log-sum-exp."""
    hidden, weight, labels = make_batch(64)
    ref_loss = reference(hidden, weight, labels)[0]
    unmasked = run_head(build_lm_head(name, CHUNK), hidden, weight, labels)[0]
    masked = run_head(build_lm_head(name, CHUNK, vocab_size=VOCAB), hidden, weight, labels)[0]
    assert abs(float(unmasked - ref_loss)) > 1.0
    torch.testing.assert_close(masked, ref_loss, rtol=TOL, atol=TOL)


def test_bf16_padding_gives_finite_zero_gradient(tp1):
    hidden, weight, labels = make_batch(64)
    for head in heads():
        loss, _, dh, dw = run_head(head, hidden.bfloat16(), weight.bfloat16(), labels)
        assert torch.isfinite(loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
        assert float(dw[VOCAB:].abs().max()) == 0.0
        torch.testing.assert_close(loss, reference(hidden, weight, labels)[0], rtol=2e-2, atol=0)


def test_padding_label_is_rejected(tp1):
    hidden, weight, labels = make_batch(64)
    labels[1, 3] = VOCAB + 2  # inside the padded weight, outside the vocabulary
    for head in heads():
        with pytest.raises(ValueError, match=rf"label id {VOCAB + 2} is outside the vocabulary "
                                             rf"\[0, {VOCAB}\)"):
            head.loss(hidden, weight, labels)
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        build_lm_head("full", vocab_size=0)


# ------------------------------------------------------------------------- TP = 2 (gloo)
def _tp2_body(rank, world_size, v_pad):
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    groups = initialize_parallel(get_backend("cpu"), ParallelLayout(tp=world_size))
    hidden, weight, labels = make_batch(v_pad)
    v_local, s_local = v_pad // world_size, SEQ // world_size
    shard = weight[rank * v_local:(rank + 1) * v_local]
    results = {}
    for head in heads(groups=groups):
        for sp in (False, True):
            local_hidden = hidden[rank * s_local:(rank + 1) * s_local] if sp else hidden
            loss, _, dh, dw = run_head(head, local_hidden, shard, labels, sequence_parallel=sp)
            with torch.no_grad():
                picked = head.logits_for_rows(local_hidden, shard, ROWS, sequence_parallel=sp)
            results[(head.name, sp)] = (loss, dh, dw, picked)
    return results


@pytest.mark.parametrize("v_pad", [64, 128], ids=["part-padding-shard", "all-padding-shard"])
def test_tensor_parallel_2_leaves_padding_ids_out(v_pad):
    hidden, weight, labels = make_batch(v_pad)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels)
    full_logits = F.linear(hidden, weight).reshape(SEQ * BATCH, -1)[ROWS]
    per_rank = run_distributed(_tp2_body, world_size=2, args=(v_pad,))
    for key in per_rank[0]:
        (loss0, dh0, dw0, pick0), (loss1, dh1, dw1, pick1) = per_rank[0][key], per_rank[1][key]
        for loss in (loss0, loss1):
            torch.testing.assert_close(loss, ref_loss, rtol=TOL, atol=TOL, msg=str(key))
        dw = torch.cat([dw0, dw1])
        torch.testing.assert_close(dw, ref_dw, rtol=TOL, atol=TOL, msg=str(key))
        assert torch.isfinite(dw).all() and float(dw[VOCAB:].abs().max()) == 0.0, key
        dh = torch.cat([dh0, dh1]) if key[1] else dh0
        torch.testing.assert_close(dh, ref_dh, rtol=TOL, atol=TOL, msg=str(key))
        picked = torch.cat([pick0, pick1], dim=1)
        torch.testing.assert_close(picked[:, :VOCAB], full_logits[:, :VOCAB], rtol=TOL, atol=TOL)
        assert bool((picked[:, VOCAB:] == float("-inf")).all()), key


# ------------------------------------------------------------------------ LongVitaModel
@pytest.mark.parametrize("lm_head", ["full", "chunked", "logits-masked"])
def test_model_loss_ignores_padding_rows(tp1, lm_head):
    """tiny.yaml with vocab_size 1000 (padded to 1024): the model's loss equals the fp64 cross
    entropy of its own (vocabulary-sliced) logits, whatever the padding rows of the output layer
    hold; logits and last_logits have exactly vocab_size columns."""
    from mindspeed_vita.config.model import ModelConfig
    from mindspeed_vita.models.vlm import LongVitaModel

    with open(os.path.join(REPO, "configs", "model", "tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    raw.update(params_dtype="float32", lm_head=lm_head, lm_head_chunk_size=7)
    raw["language"]["vocab_size"] = 1000
    cfg = ModelConfig.model_validate(raw)
    model = LongVitaModel(cfg, get_backend("cpu"), groups=tp1, context_token_ids=[999])
    weight = model.language.output_weight
    assert weight.shape[0] == 1024
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 998, (2, 10), generator=gen)
    positions = torch.arange(10).repeat(2, 1)
    labels = torch.randint(0, 1000, (2, 10), generator=gen)
    labels[0, 9] = 999  # the last real id
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    losses = []
    for scale in (0.0, 5.0):
        with torch.no_grad():
            weight[1000:] = scale * torch.randn(24, weight.shape[1], generator=gen)
            logits = model.logits(ids, positions)  # [b, s, 1000]
            loss_sum, count = model(model.build_inputs(batch_from_tensors(ids, positions,
                                                                          labels=labels)))
        assert logits.shape == (2, 10, 1000)
        inputs = model.build_inputs(batch_from_tensors(ids, positions), with_labels=False)
        assert model.last_logits(model.hidden_states(inputs)).shape == (2, 1000)
        expected = F.cross_entropy(logits.double().reshape(-1, 1000), shifted.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        assert int(count) == int((shifted != IGNORE_INDEX).sum())
        torch.testing.assert_close(loss_sum.double(), expected, rtol=TOL, atol=TOL)
        losses.append(loss_sum)
    torch.testing.assert_close(losses[0], losses[1], rtol=TOL, atol=0)
