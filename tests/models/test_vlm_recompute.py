"""LongVitaModel recompute="vision" (stage 2: ViT + projector activation checkpointing) against
recompute="none" (TP=1, fp32): the same loss and gradients, and neither the projector's
activations nor its weights are saved for backward - it runs again in backward instead."""
import os

import pytest
import torch
import yaml

from backends import get_backend
from mindspeed_vita.config.model import ModelConfig
from mindspeed_vita.models.inputs import batch_from_tensors
from mindspeed_vita.models.vlm import LongVitaModel
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTEXT_ID = 1000
TOKENS_PER_TILE = 4  # tiny.yaml: 56 px tiles, patch 14, pixel shuffle 0.5
SEQ, BATCH, TILES = 16, 2, 3


@pytest.fixture(scope="module")
def models():
    """{recompute: model} for "none" and "vision", with the same weights."""
    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(), seed=9)
    with open(os.path.join(REPO, "configs", "model", "tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    cfg = ModelConfig.model_validate(dict(raw, params_dtype="float32"))
    built = {mode: LongVitaModel(cfg, backend, groups=groups, context_token_ids=[CONTEXT_ID],
                                 recompute=mode)
             for mode in ("none", "vision")}
    built["vision"].load_state_dict(built["none"].state_dict())
    yield built
    destroy_parallel()


def batch():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 900, (BATCH, SEQ), generator=gen)
    ids[0, 2:2 + 2 * TOKENS_PER_TILE] = CONTEXT_ID
    ids[1, 6:6 + TOKENS_PER_TILE] = CONTEXT_ID
    labels = torch.randint(0, 900, (BATCH, SEQ), generator=gen)
    labels[ids == CONTEXT_ID] = -100
    return ids, torch.arange(SEQ).repeat(BATCH, 1), torch.randn(TILES, 3, 56, 56, generator=gen), \
        labels


def loss_of(model):
    ids, positions, pixels, labels = batch()
    loss_sum, count = model(model.build_inputs(batch_from_tensors(ids, positions, pixels, labels)))
    return loss_sum / count


def test_vision_recompute_gives_the_same_loss_and_grads(models):
    results = {}
    for mode, model in models.items():
        model.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        results[mode] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss, grads), (loss_rc, grads_rc) = results["none"], results["vision"]
    assert torch.equal(loss, loss_rc)
    assert sorted(grads) == sorted(grads_rc)
    for name, grad in grads.items():
        assert float(grad.abs().max()) > 0, name
        assert torch.equal(grad, grads_rc[name]), name


def saved_projector_tensors(model):
    """(names of projector tensors autograd saved for backward during the forward, projector
    forward calls in forward + backward)."""
    projector = model.projector
    activations = {}  # name -> tensor, held so no storage is reused while counting

    def keep(prefix):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and f"{prefix}.in" not in activations:
                activations[f"{prefix}.in"] = inputs[0]
                activations[f"{prefix}.out"] = output
        return hook

    # calls of the projector's first module: a recompute reruns it
    calls = [0]
    handles = [projector.norm.register_forward_pre_hook(
        lambda m, i: calls.__setitem__(0, calls[0] + 1))]
    handles += [getattr(projector, name).register_forward_hook(keep(name))
                for name in ("norm", "fc1", "fc2")]
    saved = []
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            loss = loss_of(model)
        ptrs = {t.untyped_storage().data_ptr() for t in saved}
        tracked = dict(activations, **{f"param {n}": p for n, p in projector.named_parameters()})
        hit = sorted(n for n, t in tracked.items() if t.untyped_storage().data_ptr() in ptrs)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return hit, calls[0]


def test_vision_recompute_saves_no_projector_activations(models):
    hit, calls = saved_projector_tensors(models["none"])
    # without recompute the projector's inputs, activations and weights are kept for backward
    assert {"norm.in", "fc1.in", "fc2.in", "param fc1.weight", "param fc2.weight"} <= set(hit)
    assert calls == 1
    hit, calls = saved_projector_tensors(models["vision"])
    assert hit == []
    assert calls == 2  # the forward, then the recompute in backward
