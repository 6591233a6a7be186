"""Ring attention over zigzag shards equals full causal attention on the whole sequence.

Every case runs the ring in CP gloo processes and compares this rank's output and q/k/v
gradients with the zigzag shard of full attention computed in one process by the same
backend: the CPU backend and the NPU backend driving the CPU fake of torch_npu; dense joint
input and packed reset input whose samples have unequal lengths (the first exactly 2*CP tokens,
so every zigzag chunk of it is one token); GQA throughout. Tolerances (reference sheet sec. 4):
fp32 1e-5; bf16 atol=rtol=2.5e-2 (MHA) / 3.5e-2 (GQA) plus RMSE <= 0.01. Several cases share one
process launch to keep the multi-process part short.
"""
import pytest
import torch
import torch.distributed as dist

from backends.attention_params import AttentionParams
from backends.cpu import CPUBackend
from backends.fakes import FakeTorchNPU
from backends.npu import NPUBackend
from mindspeed_vita.parallel import ring_attention as ring_module
from mindspeed_vita.parallel.ring_attention import (RingAttentionParams, RingGroup,
                                                    merge_partial, ring_attention)
from mindspeed_vita.parallel.zigzag import ZigzagShard
from tests.dist_utils import run_distributed

N_Q, N_KV, HEAD_DIM = 4, 2, 8  # GQA: two query heads per kv head


def _backend(name):
    return CPUBackend() if name == "cpu" else NPUBackend(torch_npu_module=FakeTorchNPU())


def _case_inputs(case, cp):
    """Global q, k, v, dout (identical in every process) and the batch geometry."""
    layout, dtype = case["layout"], case["dtype"]
    gen = torch.Generator().manual_seed(1234 + cp)
    if layout == "dense":
        batch, seq = 2, 4 * cp
        lead, cu = (batch, seq), None
    else:
        lengths = [2 * cp, 6 * cp, 4 * cp]  # the first sample: one token per zigzag chunk
        batch, seq = 1, sum(lengths)
        lead, cu = (seq,), [0]
        for n in lengths:
            cu.append(cu[-1] + n)
    tensors = [torch.randn(*lead, heads, HEAD_DIM, generator=gen).to(dtype)
               for heads in (N_Q, N_KV, N_KV, N_Q)]
    return tensors, batch, seq, cu


def _plan(batch, seq, cp, rank, cu):
    return ZigzagShard.build(batch, seq, cp, rank, cu)


def _shard(x, plan, packed):
    return plan.shard(x[None])[0] if packed else plan.shard(x)


def _ring_body(rank, world_size, cases):
    # the group is started here rather than by run_distributed, whose teardown imports
    # megatron (seconds of CPU per process) that this test never uses
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        return _ring_cases(rank, world_size, cases)
    finally:
        dist.destroy_process_group()


def _ring_cases(rank, world_size, cases):
    results = []
    ring = RingGroup.of(None)
    for case in cases:
        backend = _backend(case["backend"])
        (q, k, v, dout), batch, seq, cu = _case_inputs(case, world_size)
        packed = cu is not None
        plan = _plan(batch, seq, world_size, rank, cu)
        params = RingAttentionParams.from_shard(plan)
        local = [_shard(x, plan, packed).requires_grad_() for x in (q, k, v)]
        out = ring_attention(*local, params, backend, ring)
        out.backward(_shard(dout, plan, packed))
        got = {"out": out.detach(), "dq": local[0].grad, "dk": local[1].grad,
               "dv": local[2].grad}
        results.append({name: (str(t.dtype), t) for name, t in got.items()})
    return results


def _reference(case, cp):
    """Full causal attention of the whole sequence in this process, with its gradients."""
    backend = _backend(case["backend"])
    (q, k, v, dout), _, _, cu = _case_inputs(case, cp)
    params = (AttentionParams.dense("causal") if cu is None
              else AttentionParams.packed(cu, mask="causal"))
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = backend.attention(q, k, v, params)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _assert_close(actual, expected, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=what)
        return
    tol = 3.5e-2 if N_Q != N_KV else 2.5e-2
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, msg=what)
    rmse = (actual.float() - expected.float()).pow(2).mean().sqrt().item()
    assert rmse <= 0.01, f"{what}: RMSE {rmse:.4f} > 0.01"


def _check(cases, cp):
    per_rank = run_distributed(_ring_body, world_size=cp, args=(cases,),
                               init_process_group=False)
    for i, case in enumerate(cases):
        ref = _reference(case, cp)
        (_, _, _, _), batch, seq, cu = _case_inputs(case, cp)
        for rank in range(cp):
            plan = _plan(batch, seq, cp, rank, cu)
            got = per_rank[rank][i]
            for name in ("out", "dq", "dk", "dv"):
                expected = _shard(ref[name], plan, cu is not None)
                dtype, value = got[name]
                assert dtype == str(expected.dtype), f"{case} rank {rank} {name}: {dtype}"
                _assert_close(value.to(expected.dtype), expected, case["dtype"],
                              f"{case} rank {rank} {name}")


def _cases(*specs):
    return [dict(backend=b, layout=layout, dtype=dtype) for b, layout, dtype in specs]


def test_ring_matches_full_attention_cp2():
    _check(_cases(("cpu", "dense", torch.float32), ("cpu", "packed", torch.float32),
                  ("cpu", "packed", torch.bfloat16), ("cpu", "dense", torch.bfloat16),
                  ("npu", "dense", torch.float32), ("npu", "packed", torch.float32),
                  ("npu", "packed", torch.bfloat16)), cp=2)


def test_ring_matches_full_attention_cp4():
    _check(_cases(("cpu", "dense", torch.float32), ("cpu", "packed", torch.float32),
                  ("cpu", "packed", torch.bfloat16), ("npu", "packed", torch.float32)), cp=4)


# ------------------------------------------------------------- single-process pieces
def test_merge_matches_attention_over_the_union_of_keys():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 2, 8, generator=gen)
    k, v = torch.randn(1, 9, 2, 8, generator=gen), torch.randn(1, 9, 2, 8, generator=gen)
    backend = CPUBackend()
    full_out, full_lse = backend.attention_forward(q, k, v, AttentionParams.dense("none"))
    a = backend.attention_forward(q, k[:, :4], v[:, :4], AttentionParams.dense("none"))
    b = backend.attention_forward(q, k[:, 4:], v[:, 4:], AttentionParams.dense("none"))
    out, lse = merge_partial(*a, *b, packed=False)
    torch.testing.assert_close(out, full_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=0)


def test_merge_keeps_rows_without_keys_at_zero():
    out = torch.zeros(3, 1, 2)  # packed [t, n, d], lse [n, t]
    lse = torch.tensor([[float("-inf"), 0.0, float("-inf")]])
    block = torch.ones(3, 1, 2)
    block_lse = torch.tensor([[float("-inf"), float("-inf"), 0.0]])
    merged, merged_lse = merge_partial(out, lse, block, block_lse, packed=True)
    assert torch.isfinite(merged).all()
    assert merged[0].abs().sum() == 0 and merged[1].abs().sum() == 0
    torch.testing.assert_close(merged[2], torch.ones(1, 2))
    assert merged_lse[0, 0] == float("-inf")


def test_packed_params_halve_every_sample():
    params = RingAttentionParams.packed([0, 2, 8, 12])
    assert params.first_half.tolist() == [0, 2, 3, 4, 8, 9]
    assert params.second_half.tolist() == [1, 5, 6, 7, 10, 11]
    assert params.diagonal.mask == "causal" and params.diagonal.cu_seqlens_q_host == (0, 2, 8, 12)
    assert params.earlier.mask == "none" and params.earlier.cu_seqlens_kv_host == (0, 1, 4, 6)
    assert params.later.cu_seqlens_q_host == (0, 1, 4, 6)
    assert params.later.cu_seqlens_kv_host == (0, 2, 8, 12)


def test_packed_params_refuse_odd_local_lengths():
    with pytest.raises(ValueError, match="local sample 1 has 3 tokens"):
        RingAttentionParams.packed([0, 2, 5])


def test_single_rank_ring_is_full_attention():
    # CP 1: the ring is its diagonal step alone (no transfer, no process group needed)
    case = dict(backend="cpu", layout="packed", dtype=torch.float32)
    (q, k, v, dout), _, _, cu = _case_inputs(case, 1)
    ref = _reference(case, 1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*leaves, RingAttentionParams.packed(cu), CPUBackend(),
                         RingGroup(group=None, ranks=(0,), rank=0))
    out.backward(dout)
    for name, got in zip(("out", "dq", "dk", "dv"), (out, *(x.grad for x in leaves))):
        torch.testing.assert_close(got, ref[name], atol=1e-5, rtol=0, msg=name)


class _RecordingExchange:
    """Stands in for the P2P exchange in one process: 'receives' what it sends (as a ring of
    one would) and records when transfers are posted and awaited."""

    events = []

    def __init__(self, ring, tensors, tag):
        self.kind = "kv" if tag == ring_module._KV_TAG else "grad"
        self.tensors = [t.clone() for t in tensors]
        self.events.append(f"post {self.kind}")

    def wait(self):
        self.events.append(f"wait {self.kind}")
        return self.tensors


class _RecordingBackend(CPUBackend):
    def attention_forward(self, q, k, v, params):
        _RecordingExchange.events.append("compute")
        return super().attention_forward(q, k, v, params)

    def attention_backward(self, *args):
        _RecordingExchange.events.append("compute")
        return super().attention_backward(*args)


def test_transfers_are_posted_before_the_block_they_overlap(monkeypatch):
    monkeypatch.setattr(ring_module, "_Exchange", _RecordingExchange)
    _RecordingExchange.events = []
    backend, ring = _RecordingBackend(), RingGroup(group=None, ranks=(0, 1, 2), rank=1)
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    params = RingAttentionParams.dense()
    out, lse = ring_module.ring_forward(q, k, v, params, backend, ring)
    # every step but the last posts the next kv before computing, and waits for it after
    assert _RecordingExchange.events == ["post kv", "compute", "wait kv"] * 2 + ["compute"]
    _RecordingExchange.events = []
    ring_module.ring_backward(torch.ones_like(out), q, k, v, out, lse, params, backend, ring)
    # dk/dv go one hop behind kv: posted after each block, awaited after the next block;
    # the last hop (home) is awaited at the end
    assert _RecordingExchange.events == (
        ["post kv", "compute", "post grad", "wait kv",
         "post kv", "compute", "wait grad", "post grad", "wait kv",
         "compute", "wait grad", "post grad", "wait grad"])
