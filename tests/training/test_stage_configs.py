"""The four paper stage configs validate at the paper's world sizes (192 devices for stages 1-2,
512 for stages 3-4) with TP 8 and CP 1/1/2/8, and build the 14B model on the meta device as
TP rank shards of 8 gloo processes; the demo configs are the same stages at tiny scale."""
import pytest

from mindspeed_vita.config.loader import load_config
from tests.dist_utils import run_distributed

STAGES = {1: (192, 1, 24), 2: (192, 1, 24), 3: (512, 2, 32), 4: (512, 8, 8)}
#: paper Table 2 (docs/long-vita.md, section 3): trained parts, lr, min lr, gbs, iters, seq,
#: seed, recompute
TABLE = {1: ({"projector"}, 1e-3, 1e-5, 512, 1000, 32768, 42, "none", "reset"),
         2: ({"vision", "projector", "language"}, 1e-5, 1e-7, 540, 5000, 16384, 4242, "vision",
             "reset"),
         3: ({"projector", "language"}, 5e-6, 1e-7, 64, 1000, 131072, 424242, "full", "joint"),
         4: ({"projector", "language"}, 5e-6, 1e-7, 8, 500, 1048576, 42424242, "full", "joint")}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_paper_stage_table_and_layout(n):
    stage = load_config(f"configs/stages/stage{n}.yaml")
    trained, lr, min_lr, gbs, iters, seq, seed, recompute, packing = TABLE[n]
    t = stage.training
    assert (set(t.trainable), t.lr, t.min_lr, t.global_batch_size, t.train_iters) == (
        trained, lr, min_lr, gbs, iters)
    assert (stage.data.seq_length, t.seed, t.recompute, stage.data.packing) == (
        seq, seed, recompute, packing)
    assert (t.warmup_fraction, t.weight_decay, t.clip_grad, t.adam_beta1, t.adam_beta2,
            t.adam_eps, t.lr_decay_style) == (0.03, 0.0, 1.0, 0.9, 0.999, 1e-8, "cosine")
    assert (stage.model.lm_head == "logits-masked") == (n == 4)
    if n == 2:
        assert (t.vision_lr_mult, t.vision_layer_decay) == (0.1, 0.9)
    world, cp, dp = STAGES[n]
    layout = stage.check_world_size(world)
    assert (layout.tp, layout.pp, layout.cp, layout.dp, layout.sequence_parallel) == (
        8, 1, cp, dp, True)
    demo = load_config(f"configs/demo/stage{n}.yaml")
    assert set(demo.training.trainable) == trained and demo.data.packing == packing
    assert (demo.training.recompute, demo.training.seed) == (recompute, seed)


def _meta_build_tp8(rank, world_size):
    from backends import get_backend
    from mindspeed_vita.models.build import build_meta_model
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    groups = initialize_parallel(get_backend("cpu"),
                                 ParallelLayout(tp=8, sequence_parallel=True), seed=1)
    out = {}
    for n in (1, 2, 3, 4):
        model = build_meta_model(load_config(f"configs/stages/stage{n}.yaml").model,
                                 get_backend("cpu"), groups=groups)
        sharded = sum(p.numel() for p in model.parameters()
                      if getattr(p, "tensor_model_parallel", False))
        replicated = sum(p.numel() for p in model.parameters()
                         if not getattr(p, "tensor_model_parallel", False))
        qkv = tuple(model.language.decoder.layers[0].self_attention.linear_qkv.weight.shape)
        out[n] = (sharded, replicated, qkv, all(p.is_meta for p in model.parameters()))
    return out


@pytest.mark.heavy
def test_14b_builds_on_meta_as_tp8_shards():
    """8 gloo processes (one TP group of 8; CP and DP do not change a rank's shapes)."""
    from tests.models.test_14b_meta import (
        internvit_300m_params, long_vita_projector_params, qwen25_14b_params)

    per_rank = run_distributed(_meta_build_tp8, world_size=8, timeout=600)
    hidden, vocab, vocab_tp8 = 5120, 152064, 152576  # padded to a multiple of 128 * 8
    for n in (1, 2, 3, 4):
        sharded = sum(r[n][0] for r in per_rank)
        replicated = {r[n][1] for r in per_rank}
        assert len(replicated) == 1 and all(r[n][3] for r in per_rank)
        # qkv of one rank: (40 query + 2 * 8 kv heads) / 8 of 128
        assert {r[n][2] for r in per_rank} == {((40 + 16) * 128 // 8, hidden)}
        total = sharded + replicated.pop()
        expected = (internvit_300m_params() + long_vita_projector_params()
                    + qwen25_14b_params() + 2 * (vocab_tp8 - vocab) * hidden)
        assert total == expected, (n, total, expected)
