"""CP decode: a query against a KV cache sharded over CP ranks equals attention over the whole
cache (gloo processes, CPU backend and the NPU backend on the fake)."""
import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed


def _reference(q, k, v, lengths=None):
    """Plain attention of each query row over all keys of its sequence (GQA), fp64."""
    n_q, n_kv = q.shape[-2], k.shape[-2]
    k = k.repeat_interleave(n_q // n_kv, dim=-2).double()
    v = v.repeat_interleave(n_q // n_kv, dim=-2).double()
    scores = torch.einsum("bqnd,bknd->bnqk", q.double(), k) / q.shape[-1] ** 0.5
    if lengths is not None:
        mask = torch.arange(k.shape[1])[None, :] >= torch.tensor(lengths)[:, None]  # [b, s_kv]
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v)


def _owner(s_kv, cp, scheme):
    """Rank that holds each cached position: zigzag chunks (a prefilled prompt) or round robin
    (decoded tokens placed to keep shards balanced)."""
    if scheme == "roundrobin":
        return torch.arange(s_kv) % cp
    chunk = -(-s_kv // (2 * cp))
    idx = torch.arange(s_kv) // chunk
    return torch.where(idx < cp, idx, 2 * cp - 1 - idx)


def _body(rank, world, backend_name, scheme, dtype_name):
    from backends import get_backend
    from backends.attention_params import AttentionParams
    from mindspeed_vita.parallel.cp_decode import cp_decode_attention

    if backend_name == "npu":
        from backends.fakes import FakeTorchNPU
        from backends.npu import NPUBackend

        backend = NPUBackend(torch_npu_module=FakeTorchNPU())
    else:
        backend = get_backend("cpu")
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    b, s_kv, n_q, n_kv, d = 2, 37, 4, 2, 16
    q = torch.randn(b, 1, n_q, d, generator=g)
    k = torch.randn(b, s_kv, n_kv, d, generator=g)
    v = torch.randn(b, s_kv, n_kv, d, generator=g)
    owner = _owner(s_kv, world, scheme)
    mine = (owner == rank).nonzero().flatten()
    # dense: every row has the same cache length
    dense = cp_decode_attention(q.to(dtype), k[:, mine].to(dtype), v[:, mine].to(dtype),
                                AttentionParams.dense(mask="none"), backend, dist.group.WORLD)
    # packed: rows with different cache lengths (row 1 holds only 3 keys: some ranks hold none)
    lengths = [s_kv, 3]
    k_rows = [k[i, mine[mine < lengths[i]]] for i in range(b)]
    v_rows = [v[i, mine[mine < lengths[i]]] for i in range(b)]
    cu_kv = [0]
    for rows in k_rows:
        cu_kv.append(cu_kv[-1] + rows.shape[0])
    params = AttentionParams.packed(list(range(b + 1)), cu_kv, mask="none", device="cpu")
    packed = cp_decode_attention(q[:, 0].to(dtype), torch.cat(k_rows).to(dtype),
                                 torch.cat(v_rows).to(dtype), params, backend, dist.group.WORLD)
    return {"dense": dense.float(), "packed": packed.float(), "q": q, "k": k, "v": v,
            "lengths": lengths}


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("scheme", ["zigzag", "roundrobin"])
def test_cp_decode_equals_attention_over_the_whole_cache(cp, scheme):
    results = run_distributed(_body, world_size=cp, args=("cpu", scheme, "float32"))
    r0 = results[0]
    want = _reference(r0["q"], r0["k"], r0["v"]).float()
    want_packed = _reference(r0["q"], r0["k"], r0["v"], r0["lengths"])[:, 0].float()
    for r in results:
        assert (r["dense"] - want).abs().max() <= 1e-5
        assert (r["packed"] - want_packed).abs().max() <= 1e-5


def test_cp_decode_on_the_npu_backend_fake_bf16():
    results = run_distributed(_body, world_size=2, args=("npu", "zigzag", "bfloat16"))
    r0 = results[0]
    want = _reference(r0["q"], r0["k"], r0["v"]).float()
    for r in results:
        assert (r["dense"] - want).abs().max() <= 2e-2
