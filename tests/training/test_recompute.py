"""The stage's recompute policy (training.recompute: none / vision = ViT + projector / full =
also every LLM layer), built the way the trainer builds its model, on a real packed batch of
the demo data (fp32, one process):

* loss and every gradient equal those without recompute (<= 1e-6 relative);
* recompute is active where the policy says and only there: the checkpointed modules run their
  forward again during backward, the others do not;
* the activations autograd keeps for backward shrink: none > vision > full.
"""
import functools

import pytest
import torch

from tests.training.train_helpers import DEMO_STAGE2, synthetic_data

POLICIES = ("none", "vision", "full")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """{policy: model} with the same weights, and one packed micro batch of stage 2's data."""
    from backends import get_backend
    from mindspeed_vita.config.loader import load_config
    from mindspeed_vita.data.loader import pipeline_from_config
    from mindspeed_vita.data.render import render_sample
    from mindspeed_vita.data.tokenizer import load_tokenizer
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel
    from mindspeed_vita.training.trainer import _build_model, plan_start

    data = synthetic_data(str(tmp_path_factory.mktemp("synth")))
    backend = get_backend("cpu")
    models, batch = {}, None
    for policy in POLICIES:
        stage = load_config(DEMO_STAGE2, [f"data.mixture={data['stage2']}",
                                          f"model.tokenizer={data['tokenizer']}",
                                          "data.seq_length=512", "data.num_workers=0",
                                          f"training.recompute={policy}"])
        if policy == "none":
            plan = plan_start(stage, world_size=1)
            groups = initialize_parallel(backend, plan.layout, seed=stage.training.seed)
            tokenizer = load_tokenizer(plan.tokenizer_dir)
            render = functools.partial(render_sample, tokenizer=tokenizer, model_cfg=stage.model,
                                       max_num_frame=stage.data.max_num_frame,
                                       max_images=stage.data.max_images,
                                       max_frames=stage.data.max_frames)
            pipeline = pipeline_from_config(stage, render_fn=render, pad_id=tokenizer.pad_id,
                                            context_token_ids=tokenizer.context_token_ids)
            batch = next(b for b in pipeline if b.pixel_values.shape[0] > 0)
        models[policy] = _build_model(stage, plan, backend, groups, tokenizer)
    for policy in POLICIES[1:]:
        models[policy].load_state_dict(models["none"].state_dict())
    yield models, batch
    destroy_parallel()


def _run(model, batch):
    """(loss, grads, forward calls {part: (in forward, in forward + backward)}, bytes of the
    tensors autograd saved for backward)."""
    calls = {"vit": [0], "projector": [0], "llm": [0]}
    modules = {"vit": model.vision.layers[0], "projector": model.projector.norm,
               "llm": model.language.decoder.layers[0]}
    handles = [modules[k].register_forward_pre_hook(
        lambda m, i, c=calls[k]: c.__setitem__(0, c[0] + 1)) for k in modules]
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    try:
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_sum, count = model(model.build_inputs(batch))
        in_forward = {k: c[0] for k, c in calls.items()}
        loss = loss_sum / count
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return (loss.detach(), grads, {k: (in_forward[k], c[0]) for k, c in calls.items()},
            sum(storages.values()))


def test_recompute_policies_same_loss_and_grads_and_active_where_expected(setup):
    models, batch = setup
    results = {policy: _run(models[policy], batch) for policy in POLICIES}
    loss, grads, calls, saved = results["none"]
    assert len(grads) == len(list(models["none"].parameters()))  # stage 2 trains everything
    recomputed = {"none": set(), "vision": {"vit", "projector"},
                  "full": {"vit", "projector", "llm"}}
    for policy in POLICIES:
        loss_p, grads_p, calls_p, _ = results[policy]
        assert abs(float(loss_p - loss)) <= 1e-6 * abs(float(loss)), policy
        assert sorted(grads_p) == sorted(grads)
        for name, grad in grads.items():
            scale = float(grad.abs().max())
            assert scale > 0, name
            assert float((grads_p[name] - grad).abs().max()) <= 1e-6 * scale, (policy, name)
        for part, (forward, total) in calls_p.items():
            assert forward >= 1, (policy, part)
            expected = 2 * forward if part in recomputed[policy] else forward
            assert total == expected, (policy, part, forward, total)
    saved = {policy: results[policy][3] for policy in POLICIES}
    assert saved["none"] > saved["vision"] > saved["full"], saved
