"""Freezing and learning rates per stage, read back from the megatron optimizer's groups."""
import math

import pytest
import torch

from mindspeed_vita.config.loader import load_config
from mindspeed_vita.config.schema import ConfigError, TrainingConfig
from mindspeed_vita.training.optimizer import (
    apply_freezing, build_optimizer, build_scheduler, group_lrs, vision_layer_id,
    vision_lr_factor, warmup_steps)

REPO_STAGES = "configs/stages/stage{}.yaml"
DEMO_STAGES = "configs/demo/stage{}.yaml"


def test_vit_layer_decay_rule_of_the_paper():
    """lr x 0.1 x 0.9^(25 - layer) for the 24-layer InternViT; embeddings are layer 0."""
    training = load_config(REPO_STAGES.format(2)).training
    assert vision_layer_id("vision.patch_embedding.weight", 24) == 0
    assert vision_layer_id("module.vision.position_embedding", 24) == 0
    assert vision_layer_id("vision.class_embedding", 24) == 0
    assert vision_layer_id("vision.layers.0.attn.qkv.weight", 24) == 1
    assert vision_layer_id("module.vision.layers.23.mlp.fc2.bias", 24) == 24
    for name, layer in (("vision.patch_embedding.weight", 0), ("vision.layers.0.mlp_scale", 1),
                        ("vision.layers.11.attn.proj.weight", 12),
                        ("vision.layers.23.attn_norm.weight", 24)):
        assert vision_lr_factor(name, training, 24) == pytest.approx(0.1 * 0.9 ** (25 - layer))


def _groups_of(stage_yaml, groups):
    """(optimizer, {param name: group}, model) of a demo stage's tiny model, 1 process."""
    from backends import get_backend
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from mindspeed_vita.models.vlm import LongVitaModel

    stage = load_config(stage_yaml)
    backend = get_backend("cpu")
    model = LongVitaModel(stage.model, backend, groups=groups, context_token_ids=[5])
    apply_freezing(model, stage.training.trainable)
    ddp = DistributedDataParallel(model.language.decoder.config,
                                  DistributedDataParallelConfig(),
                                  model)
    opt = build_optimizer(ddp, stage.training, params_dtype=torch.float32,
                          num_vision_layers=stage.model.vision.num_layers, distributed=False)
    scheduler = build_scheduler(opt, stage.training)
    # fp32 without the distributed optimizer: the groups hold the model's own parameters
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {}
    for group in opt.param_groups:
        for p in group["params"]:
            by_name[names[id(p)]] = group
    return stage, opt, scheduler, by_name, model


@pytest.fixture()
def parallel():
    from backends import get_backend
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    yield initialize_parallel(get_backend("cpu"), ParallelLayout(), seed=3)
    destroy_parallel()


def test_stage_groups(parallel):
    """Stage 1: projector only; stage 2: everything, ViT at the layer-decayed lr; 3-4: no ViT."""
    trained_parts = {1: {"projector"}, 2: {"vision", "projector", "language"},
                     3: {"projector", "language"}, 4: {"projector", "language"}}
    for stage_no, parts in trained_parts.items():
        stage, opt, scheduler, by_name, model = _groups_of(DEMO_STAGES.format(stage_no), parallel)
        assert {n.split(".")[0] for n in by_name} == parts, stage_no
        for name, param in model.named_parameters():
            assert param.requires_grad == (name.split(".")[0] in parts), name
        lr = stage.training.lr
        n_layers = stage.model.vision.num_layers
        for name, group in by_name.items():
            expected = lr
            if name.startswith("vision."):
                depth = vision_layer_id(name, n_layers)
                expected = lr * 0.1 * 0.9 ** (n_layers + 1 - depth)
            assert group["max_lr"] == pytest.approx(expected), name
            assert group["min_lr"] == pytest.approx(expected / lr * stage.training.min_lr), name
            # megatron's rule: no weight decay on biases and 1-D parameters
            no_decay = name.endswith(".bias") or model.get_parameter(name).dim() == 1
            assert group["wd_mult"] == (0.0 if no_decay else 1.0), name
            assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
        if stage_no == 2:
            lrs = group_lrs(opt)
            assert set(lrs) == {"default"} | {f"vision.layer{i}" for i in range(n_layers + 1)}
            # the embeddings (layer 0) get the smallest lr: 0.1 * 0.9^(L+1) of the stage lr
            scheduler.num_steps = warmup_steps(stage.training)
            scheduler.step(0)
            assert group_lrs(opt)["vision.layer0"] == pytest.approx(
                lr * 0.1 * 0.9 ** (n_layers + 1))


def test_cosine_schedule_with_warmup(parallel):
    """3% warmup from 0, cosine to min_lr at train_iters, per group."""
    stage, opt, scheduler, by_name, model = _groups_of(DEMO_STAGES.format(2), parallel)
    training = stage.training.model_copy(update={"train_iters": 100})
    scheduler = build_scheduler(opt, training)
    assert warmup_steps(training) == 3
    seen = []
    for step in range(101):
        scheduler.num_steps = step
        scheduler.step(0)
        seen.append(group_lrs(opt)["default"])
    lr, min_lr = training.lr, training.min_lr
    assert seen[0] == 0.0 and seen[3] == pytest.approx(lr)
    assert seen[1] == pytest.approx(lr / 3)
    mid = 3 + (100 - 3) / 2
    assert seen[100] == pytest.approx(min_lr)
    ratio = (51.5 - 3) / 97
    assert mid == 51.5 and seen[51] < lr
    expect_52 = min_lr + 0.5 * (math.cos(math.pi * (52 - 3) / 97) + 1) * (lr - min_lr)
    assert seen[52] == pytest.approx(expect_52) and 0 < ratio < 1
    assert all(a >= b for a, b in zip(seen[3:], seen[4:]))


def test_a_stage_that_freezes_everything_is_refused(parallel):
    from backends import get_backend
    from mindspeed_vita.models.vlm import LongVitaModel

    stage = load_config(DEMO_STAGES.format(1))
    model = LongVitaModel(stage.model, get_backend("cpu"), groups=parallel, context_token_ids=[5])
    with pytest.raises(ConfigError, match="training.trainable"):
        apply_freezing(model, [])
    with pytest.raises(Exception, match="training.trainable|trainable"):
        TrainingConfig(trainable=[])
