"""CPU backend (the CI backend) against the plain-PyTorch reference math, and backend selection."""
import pytest
import torch

from backends import BackendUnavailableError, get_backend, resolve_backend_name
from backends import reference as ref
from backends.attention_params import AttentionParams
from backends.cpu import CPUBackend
from tests.backends.attention_checks import cu_seqlens

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(dtype, b=2, s=24, s_kv=None, n_q=4, n_kv=2, d=16, seed=0, packed=None):
    g = torch.Generator().manual_seed(seed)
    s_kv = s if s_kv is None else s_kv
    if packed:
        t = sum(packed)
        shape_q, shape_kv = (t, n_q, d), (t, n_kv, d)
    else:
        shape_q, shape_kv = (b, s, n_q, d), (b, s_kv, n_kv, d)
    mk = lambda shape: torch.randn(shape, generator=g).to(dtype)  # noqa: E731
    return mk(shape_q), mk(shape_kv), mk(shape_kv), mk(shape_q)


def _dense(causal):
    return AttentionParams.dense("causal" if causal else "none")


def _packed(causal, lengths_q, lengths_kv=None):
    kv = None if lengths_kv is None else cu_seqlens(lengths_kv)
    return AttentionParams.packed(cu_seqlens(lengths_q), kv,
                                  mask="causal" if causal else "none")


CASES = [
    dict(causal=True), dict(causal=False), dict(causal=False, s_kv=40),
    dict(causal=True, n_kv=4), dict(causal=True, n_kv=1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_dense_attention_matches_reference(dtype, case):
    be = CPUBackend()
    case = dict(case)
    causal = case.pop("causal")
    q, k, v, do = _inputs(dtype, **case)
    p = _dense(causal)
    out, lse = be.attention_forward(q, k, v, p)
    out_r, lse_r = ref.attention_reference(q, k, v, p)
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    torch.testing.assert_close(out.float(), out_r.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, lse_r, atol=TOL[dtype], rtol=TOL[dtype])
    grads = be.attention_backward(do, q, k, v, out_r, lse_r, p)
    grads_r = ref.attention_backward_reference(do, q, k, v, out_r, lse_r, p)
    for g, gr in zip(grads, grads_r):
        assert g.shape == gr.shape and g.dtype == gr.dtype
        torch.testing.assert_close(g.float(), gr.float(), atol=5 * TOL[dtype], rtol=5 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_varlen_matches_reference(dtype, causal):
    be = CPUBackend()
    lengths = [5, 1, 12, 7]
    q, k, v, do = _inputs(dtype, packed=lengths)
    p = _packed(causal, lengths)
    out, lse = be.attention_forward(q, k, v, p)
    out_r, lse_r = ref.attention_reference(q, k, v, p)
    assert lse.shape == (q.shape[1], q.shape[0])
    torch.testing.assert_close(out.float(), out_r.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, lse_r, atol=TOL[dtype], rtol=TOL[dtype])
    grads = be.attention_backward(do, q, k, v, out_r, lse_r, p)
    grads_r = ref.attention_backward_reference(do, q, k, v, out_r, lse_r, p)
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g.float(), gr.float(), atol=5 * TOL[dtype], rtol=5 * TOL[dtype])


def test_packed_equals_each_sequence_alone():
    be = CPUBackend()
    lengths = [6, 10]
    q, k, v, _ = _inputs(torch.float32, packed=lengths)
    out, _ = be.attention_forward(q, k, v, _packed(True, lengths))
    for sl in (slice(0, 6), slice(6, 16)):
        alone, _ = be.attention_forward(q[None, sl], k[None, sl], v[None, sl], _dense(True))
        torch.testing.assert_close(out[sl], alone[0], atol=1e-6, rtol=1e-6)


def test_backward_uses_given_stats():
    """Ring attention passes a merged (out, lse) to each block's backward: the gradients must
    follow the given statistics, not recomputed ones."""
    be = CPUBackend()
    q, k, v, do = _inputs(torch.float32)
    p = _dense(False)
    out, lse = ref.attention_reference(q, k, v, p)
    lse_merged, out_merged = lse + 0.3, out * 0.7
    g = be.attention_backward(do, q, k, v, out_merged, lse_merged, p)
    g_r = ref.attention_backward_reference(do, q, k, v, out_merged, lse_merged, p)
    g_plain = ref.attention_backward_reference(do, q, k, v, out, lse, p)
    for a, b, c in zip(g, g_r, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(g[0], g_plain[0], atol=1e-3)


def test_attention_autograd_matches_reference_autograd():
    be = CPUBackend()
    q, k, v, do = _inputs(torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    be.attention(*leaves, _dense(True)).backward(do)
    leaves_r = [t.clone().requires_grad_() for t in (q, k, v)]
    ref.attention_reference(*leaves_r, _dense(True))[0].backward(do)
    for a, b in zip(leaves, leaves_r):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_reference_matches_softmax_definition():
    """The oracle itself, against the textbook formula with an explicit mask."""
    q, k, v, _ = _inputs(torch.float64, n_kv=4)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    mask = torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
    p = s.masked_fill(mask, float("-inf")).softmax(-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", p, v)
    out, lse = ref.attention_reference(q, k, v, _dense(True))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(mask, float("-inf")), -1))


def test_fused_layers_match_reference():
    be = CPUBackend()
    x = torch.randn(3, 5, 32)
    w = torch.randn(32)
    torch.testing.assert_close(be.rms_norm(x, w, 1e-6), ref.rms_norm_reference(x, w, 1e-6))
    cos, sin = torch.randn(5, 1, 32).cos(), torch.randn(5, 1, 32).sin()
    torch.testing.assert_close(be.apply_rotary(x[:, :, None].expand(3, 5, 2, 32).transpose(0, 1),
                                               cos[:, None], sin[:, None]).shape,
                               torch.Size([5, 3, 2, 32]))
    torch.testing.assert_close(be.swiglu(x), torch.nn.functional.silu(x[..., :16]) * x[..., 16:])


def test_peak_memory_sees_a_large_allocation():
    be = CPUBackend()
    be.reset_peak_memory_stats()
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    peak = be.max_memory_allocated()
    del big
    assert peak >= 48 * 1024 * 1024


def test_selection(monkeypatch):
    monkeypatch.setenv("MINDSPEED_VITA_BACKEND", "cpu")
    assert get_backend().name == "cpu"
    monkeypatch.setenv("MINDSPEED_VITA_BACKEND", "auto")
    assert resolve_backend_name() == "cpu"  # no NPU / GPU here
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tpu'"):
        get_backend("tpu")


def test_cuda_unavailable_is_one_clear_sentence():
    with pytest.raises(BackendUnavailableError) as err:
        get_backend("cuda")
    msg = str(err.value)
    assert "\n" not in msg and "cuda" in msg and "MINDSPEED_VITA_BACKEND=cpu" in msg


@pytest.mark.parametrize("causal", [True, False])
def test_rows_without_keys_give_zero_output_and_minus_inf_lse(causal):
    """A packed sequence with no keys (or a dense batch with s_kv = 0): the CPU kernel would die
    with SIGFPE on the empty key axis; the backend returns output 0, lse -inf, gradient 0."""
    be = CPUBackend()
    q, _, _, do = _inputs(torch.float32, packed=[3, 5])
    k, v = q[:6, :2], q[2:8, :2]
    p = _packed(causal, [3, 5], [0, 6])
    out, lse = be.attention_forward(q, k, v, p)
    out_r, lse_r = ref.attention_reference(q, k, v, p)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert torch.all(lse[:, :3] == -float("inf"))
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_r, atol=1e-5, rtol=1e-5)
    grads = be.attention_backward(do, q, k, v, out, lse, p)
    grads_r = ref.attention_backward_reference(do, q, k, v, out, lse, p)
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)
    dense_q = q[None, :4]
    empty = torch.zeros(1, 0, 2, q.shape[-1])
    out, lse = be.attention_forward(dense_q, empty, empty, _dense(causal))
    assert torch.equal(out, torch.zeros_like(dense_q)) and lse.shape == (1, 4, 4)
    assert torch.all(lse == -float("inf"))
    assert all(torch.equal(g, torch.zeros_like(x)) for g, x in zip(
        be.attention_backward(dense_q, dense_q, empty, empty, out, lse, _dense(causal)),
        (dense_q, empty, empty)))
