"""LongVitaModel gradients at TP=2 (two gloo processes, fp32), with and without sequence parallel,
against the single-process TP=1 model with the same weights, images present.

Under sequence parallel each TP rank holds only its slice of the sequence, but every rank encodes
all tiles: the vision tower and projector must still get the gradient of ALL feature rows, and
the same one on every TP rank (each rank's replica, no sum needed after backward). The image
context tokens straddle the boundary of the two sequence slices. Language gradients (TP-sharded)
are gathered back to the TP=1 layout. The decoder's RMSNorm weights are marked
`sequence_parallel` (megatron's convention): under SP their gradient is partial per rank until
megatron's finalize_model_grads sums it over TP, which the test does for exactly those weights.
"""
import os

import pytest
import torch
import yaml

from mindspeed_vita.models.inputs import batch_from_tensors
from tests.dist_utils import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTEXT_ID = 1000  # the image-context token of this test (any id below vocab_size)
TOKENS_PER_TILE = 4  # tiny.yaml: 56 px tiles, patch 14, pixel shuffle 0.5
SEQ, BATCH, TILES = 16, 2, 3
TOL = 1e-5  # fp32, relative to the largest gradient entry of each tensor


def tiny_config():
    from mindspeed_vita.config.model import ModelConfig

    with open(os.path.join(REPO, "configs", "model", "tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["params_dtype"] = "float32"
    return ModelConfig.model_validate(raw)


def make_batch():
    """ids [b, s] with 3 tiles of context tokens: row 0 positions 5-12 (2 tiles, across the
    s/2 = 8 boundary of the sequence-parallel slices), row 1 positions 1-4; labels unshifted
    with a few ignored positions; pixels [3, 3, 56, 56]."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 900, (BATCH, SEQ), generator=gen)
    ids[0, 5:5 + 2 * TOKENS_PER_TILE] = CONTEXT_ID
    ids[1, 1:1 + TOKENS_PER_TILE] = CONTEXT_ID
    labels = torch.randint(0, 900, (BATCH, SEQ), generator=gen)
    labels[ids == CONTEXT_ID] = -100
    labels[1, :1] = -100
    positions = torch.arange(SEQ).repeat(BATCH, 1)
    pixels = torch.randn(TILES, 3, 56, 56, generator=gen)
    return ids, positions, labels, pixels


def loss_and_grads(model, batch):
    """Mean loss over label tokens, backward; (loss, {name: grad})."""
    ids, positions, labels, pixels = batch
    loss_sum, count = model(model.build_inputs(batch_from_tensors(ids, positions, pixels, labels)))
    loss = loss_sum / count
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return loss.detach(), grads


def _tp2_body(rank, world_size, state, batch):
    from backends import get_backend
    from mindspeed_vita.convert.checkpoint import load_full_state_into_model
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(tp=world_size))
    cfg = tiny_config()
    out = {}
    for sp in (False, True):
        model = LongVitaModel(cfg, backend, groups=groups.with_sequence_parallel(sp),
                              context_token_ids=[CONTEXT_ID])
        load_full_state_into_model(model, state, cfg, "the TP=1 reference model")
        marked = {name for name, p in model.named_parameters()
                  if getattr(p, "sequence_parallel", False)}
        out[sp] = loss_and_grads(model, batch) + (marked,)
    return out


@pytest.fixture(scope="module")
def runs():
    """(TP=1 loss and grads, per-rank TP=2 results) for the same weights and batch."""
    from backends import get_backend
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(), seed=5)
    try:
        model = LongVitaModel(tiny_config(), backend, groups=groups, context_token_ids=[CONTEXT_ID])
        state = {k: v.detach().clone() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        batch = make_batch()
        reference = loss_and_grads(model, batch)
    finally:
        destroy_parallel()
    per_rank = run_distributed(_tp2_body, world_size=2, args=(state, batch))
    return reference, per_rank


def gathered(name, shards, marked):
    """TP=2 gradient shards of `name` in the TP=1 layout (language tensors gathered; the partial
    gradients of `sequence_parallel`-marked weights summed, as finalize_model_grads does)."""
    from mindspeed_vita.convert.checkpoint import reshard_language_tensor

    if not name.startswith("language."):
        return None
    if name in marked:
        return shards[0] + shards[1]
    return reshard_language_tensor(name[len("language."):], shards, tiny_config().language,
                                   tp_size=1, tp_rank=0)


def rel_error(ours, ref):
    return float((ours - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_tp2_grads_match_tp1(runs, sp):
    (ref_loss, ref_grads), per_rank = runs
    results = [r[sp] for r in per_rank]
    for loss, _, _ in results:
        assert abs(float(loss) - float(ref_loss)) <= TOL * abs(float(ref_loss))
    marked = results[0][2]
    assert bool(marked) == sp and all(n.startswith("language.decoder.") for n in marked)
    worst = {}
    for name, ref in ref_grads.items():
        assert float(ref.abs().max()) > 0, f"{name}: the reference gradient is all zeros"
        shards = [grads[name] for _, grads, _ in results]
        full = gathered(name, shards, marked)
        if full is None:  # vision / projector: replicated, every rank holds the full gradient
            for rank, grad in enumerate(shards):
                worst[f"{name} (rank {rank})"] = rel_error(grad, ref)
        else:
            worst[name] = rel_error(full, ref)
    bad = {k: v for k, v in worst.items() if v > TOL}
    assert not bad, f"gradients differ from TP=1 (max abs error / max abs grad): {bad}"
    assert any(k.startswith("vision.") for k in worst)
    assert any(k.startswith("projector.") for k in worst)
