"""The whole LongVitaModel (vision + projector + LLM) under context parallelism equals the
single-process run: loss and EVERY parameter gradient, fp32, <= 1e-5 relative, with CP 2, CP 4,
TP 2 x CP 2 (sequence parallel) and DP 2 x CP 2, in both packing modes (reset: per-sample
zigzag through the varlen ring; joint: each row one sequence through the dense ring), with
each of the full, chunked and logits-masked heads.

The batches put images across zigzag slice boundaries and rank boundaries, so feature rows must
travel from the encoding rank to the rank holding their context tokens (and gradients back).
Each run also counts the vision encoder's input tiles per rank: every tile is encoded exactly
once across the CP group (matched by content) and per-rank work is within one tile of even.

Gradients are reduced as a trainer does: each rank backpropagates its loss sum divided by the
global label-token count, then gradients are summed over dp x cp (and the sequence-parallel
norm weights over tp, as megatron's finalize_model_grads does); language tensors are gathered
back to the TP=1 layout.
"""
import os

import pytest
import torch
import yaml

from tests.dist_utils import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTEXT_ID = 1000
TPT = 4  # tiny.yaml: 56 px tiles, patch 14, pixel shuffle 0.5 -> 4 context tokens per tile
SEQ = 64  # a multiple of 2 * cp * tp for every layout below
TOL = 1e-5
#: the loss heads, each run on every layout (chunked / logits-masked in chunks of 7 rows)
HEADS = ("full", "chunked", "logits-masked")
# (tp, cp, dp, sequence_parallel)
LAYOUTS = {"cp2": (1, 2, 1, False), "cp4": (1, 4, 1, False),
           "tp2-cp2-sp": (2, 2, 1, True), "dp2-cp2": (1, 2, 2, False)}


def tiny_config(name=None):
    """tiny.yaml in fp32. For the DP 2 x CP 2 run also dynamic-NTK RoPE with a trained length
    of 16 positions: the rotary base then grows with the WHOLE batch's length, which every CP
    rank must use (its shard's own largest position is smaller on most ranks)."""
    from mindspeed_vita.config.model import ModelConfig

    with open(os.path.join(REPO, "configs", "model", "tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["params_dtype"] = "float32"
    if name == "dp2-cp2":
        raw["language"].update(max_position_embeddings=16,
                               rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    return ModelConfig.model_validate(raw)


def make_batch(mode, rows, seed):
    """A PackedBatch of `rows` rows x SEQ tokens. Images (tile spans of TPT tokens) straddle the
    zigzag chunk boundaries of CP 2 (chunks of 16 per row in joint mode) and CP 4, and in reset
    mode the per-sample chunks; labels unshifted, -100 on context tokens and some others."""
    from mindspeed_vita.data.types import PackedBatch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 900, (rows, SEQ), generator=gen)
    labels = torch.randint(0, 900, (rows, SEQ), generator=gen)
    labels[torch.rand(rows, SEQ, generator=gen) < 0.2] = -100
    # per row: sample lengths (reset mode; each a multiple of 2 * 4) and image spans (start,
    # tiles) inside the samples
    layout = [([16, 24, 8, 16], [(4, 3), (20, 2), (50, 1)]),
              ([32, 16, 16], [(13, 2), (28, 1), (44, 1)])]
    cu, positions, n_tiles = [0], [], 0
    for row in range(rows):
        lengths, images = layout[row % 2]
        for start, tiles in images:
            tokens[row, start:start + tiles * TPT] = CONTEXT_ID
            n_tiles += tiles
        if mode == "reset":
            positions.append(torch.cat([torch.arange(n) for n in lengths]))
            for n in lengths:
                cu.append(cu[-1] + n)
        else:
            positions.append(torch.arange(SEQ))
    labels[tokens == CONTEXT_ID] = -100
    labels[:, -3:] = -100  # a little padding-like tail
    pixels = torch.randn(n_tiles, 3, 56, 56, generator=gen)
    return PackedBatch(tokens=tokens, labels=labels, position_ids=torch.stack(positions),
                       pixel_values=pixels,
                       cu_seqlens=torch.tensor(cu, dtype=torch.int32) if mode == "reset" else None)


def one_tile_batch(mode):
    """One row, one tile at positions 20-23: inside zigzag chunk 1 of 4 (CP 2, rank 1) in joint
    mode, and inside rank 1's chunks of the 16..40 sample in reset mode."""
    from mindspeed_vita.data.types import PackedBatch

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 900, (1, SEQ), generator=gen)
    tokens[0, 20:24] = CONTEXT_ID
    labels = torch.randint(0, 900, (1, SEQ), generator=gen)
    labels[tokens == CONTEXT_ID] = -100
    lengths = [16, 24, 24] if mode == "reset" else [SEQ]
    return PackedBatch(tokens=tokens, labels=labels,
                       position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                       pixel_values=torch.randn(1, 3, 56, 56, generator=gen),
                       cu_seqlens=(torch.tensor([0, 16, 40, 64], dtype=torch.int32)
                                   if mode == "reset" else None))


def batches_for(name):
    """{mode: [one batch per dp rank]}; sequence parallel needs one row per packed batch. At
    CP 2 also a batch with one tile: in joint mode all its rows sit on rank 1, so rank 0
    encodes, sends and receives nothing but still takes part in the exchange and its backward;
    in reset mode its rows straddle the two ranks."""
    tp, cp, dp, sp = LAYOUTS[name]
    rows = 1 if sp else 2
    batches = {mode: [make_batch(mode, rows, seed=10 * d + (mode == "joint")) for d in range(dp)]
               for mode in ("reset", "joint")}
    if name == "cp2":
        batches.update({f"{mode}-one-tile": [one_tile_batch(mode)] for mode in ("reset", "joint")})
    return batches


def tile_ids(pixels):
    """A content fingerprint of each tile (its pixel sum), to recognise which tiles a rank
    encoded."""
    return [round(float(t.double().sum()), 6) for t in pixels]


def run_step(model, groups, batch):
    """Loss and gradients as a trainer computes them (module doc); returns (mean loss, grads,
    fingerprints of the tiles this rank's vision encoder saw)."""
    import torch.distributed as dist

    from mindspeed_vita.models.loss import reduce_loss

    seen = []
    hook = model.vision.register_forward_pre_hook(
        lambda module, args: seen.extend(tile_ids(args[0])))
    try:
        model.zero_grad(set_to_none=True)
        terms = model(model.build_inputs(batch))
        total = reduce_loss(terms, groups)
        (terms.loss_sum / total.num_tokens.double()).backward()
    finally:
        hook.remove()
    grads = {}
    for name, p in model.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        dist.all_reduce(grad, group=groups.dp_cp)
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grad, group=groups.tp)
        grads[name] = grad
    return float(total.loss_sum) / int(total.num_tokens), grads, seen


def _parallel_body(rank, world_size, name, state, batches):
    from backends import get_backend
    from mindspeed_vita.convert.checkpoint import load_full_state_into_model
    from mindspeed_vita.models.lm_head import build_lm_head
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    tp, cp, dp, sp = LAYOUTS[name]
    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(tp=tp, cp=cp, dp=dp,
                                                         sequence_parallel=sp))
    cfg = tiny_config(name)
    model = LongVitaModel(cfg, backend, groups=groups, context_token_ids=[CONTEXT_ID])
    load_full_state_into_model(model, state, cfg, "the single-process model")
    out = {"tp_rank": groups.tp_rank, "cp_rank": groups.cp_rank, "dp_rank": groups.dp_rank,
           "marked_sp": {n for n, p in model.named_parameters()
                         if getattr(p, "sequence_parallel", False)}}
    keep_grads = groups.cp_rank == 0 and groups.dp_rank == 0
    for mode, per_dp in batches.items():
        for head in HEADS:
            # every head computes the loss of this rank's label rows only, unchanged under CP
            model.head = build_lm_head(head, 7, vocab_size=cfg.language.vocab_size,
                                        groups=groups)
            loss, grads, seen = run_step(model, groups, per_dp[groups.dp_rank])
            out[mode, head] = (loss, grads if keep_grads else None, seen)
    return out


@pytest.fixture(scope="module")
def reference_state():
    """The single-process model's weights."""
    from backends import get_backend
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(), seed=7)
    try:
        model = LongVitaModel(tiny_config(), backend, groups=groups,
                              context_token_ids=[CONTEXT_ID])
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if isinstance(v, torch.Tensor)}
    finally:
        destroy_parallel()


def reference_run(name, state, per_dp):
    """Single process: the summed loss of all dp batches over their summed label count, and
    its gradients."""
    from backends import get_backend
    from mindspeed_vita.convert.checkpoint import load_full_state_into_model
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout())
    try:
        cfg = tiny_config(name)
        model = LongVitaModel(cfg, backend, groups=groups, context_token_ids=[CONTEXT_ID])
        load_full_state_into_model(model, state, cfg, "the single-process model")
        terms = [model(model.build_inputs(batch)) for batch in per_dp]
        loss = sum(t.loss_sum for t in terms) / sum(int(t.num_tokens) for t in terms)
        loss.backward()
        return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    finally:
        destroy_parallel()


def gathered(name, by_tp, marked_sp):
    """The TP=1 layout of a gradient from the tp ranks' (already dp x cp reduced) gradients."""
    from mindspeed_vita.convert.checkpoint import reshard_language_tensor

    if len(by_tp) == 1 or not name.startswith("language.") or name in marked_sp:
        return by_tp[0]
    return reshard_language_tensor(name[len("language."):], by_tp, tiny_config().language,
                                   tp_size=1, tp_rank=0)


def rel_error(ours, ref):
    return float((ours - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cp_loss_and_every_gradient_match_one_process(reference_state, name):
    tp, cp, dp, sp = LAYOUTS[name]
    batches = batches_for(name)
    results = run_distributed(_parallel_body, world_size=tp * cp * dp,
                              args=(name, reference_state, batches), timeout=900)
    for mode, per_dp in batches.items():
        ref_loss, ref_grads = reference_run(name, reference_state, per_dp)
        for head in HEADS:
            check_head(name, mode, head, results, per_dp, ref_loss, ref_grads)


def check_head(name, mode, head, results, per_dp, ref_loss, ref_grads):
    """Loss, gradients and encoder work of one (packing mode, head) against one process."""
    tp, cp, dp, sp = LAYOUTS[name]
    key = (mode, head)
    for r in results:
        assert abs(r[key][0] - ref_loss) <= TOL * abs(ref_loss), (key, r[key][0], ref_loss)
    by_tp = {r["tp_rank"]: r[key][1] for r in results if r[key][1] is not None}
    by_tp = [by_tp[t] for t in range(tp)]
    marked_sp = results[0]["marked_sp"]  # reduced over tp in the workers already
    assert bool(marked_sp) == sp
    worst = {}
    for pname, ref in ref_grads.items():
        assert float(ref.abs().max()) > 0, f"{pname}: the reference gradient is all zeros"
        full = gathered(pname, [g[pname] for g in by_tp], marked_sp)
        worst[pname] = rel_error(full, ref)
    bad = {k: v for k, v in worst.items() if v > TOL}
    assert not bad, f"{name} {key}: gradients differ from one process: {bad}"
    assert any(k.startswith("vision.") for k in worst)
    # every tile encoded exactly once per CP group, work within one tile of even
    for d in range(dp):
        for t in range(tp):
            group = [r for r in results if r["dp_rank"] == d and r["tp_rank"] == t]
            assert len(group) == cp
            seen = sorted(x for r in group for x in r[key][2])
            assert seen == sorted(tile_ids(per_dp[d].pixel_values)), (key, d, t)
            counts = [len(r[key][2]) for r in group]
            assert max(counts) - min(counts) <= 1, counts
