"""CUDABackend: its kernel-wrapping logic on CPU (against fakes with FlashAttention-2's
contracts), and, marked `gpu`, the same parity tests the NPU backend has, on a real GPU.

CPU part (runs in CI): the fallback decision, cu_seqlens / dense -> varlen conversion, the
top-left causal split (the flash kernels align causal bottom-right), lse layouts (packed /
padded, +inf vs -inf for rows without keys), the binding of flash-attn's private functions
for each known signature style, and full forward/backward parity of the backend driving the
fake kernels against CPUBackend.

GPU part (`-m gpu`, ci/run_gpu_tests.sh): CUDABackend on CUDA tensors vs CPUBackend on the same
inputs, for every installed kernel implementation ("torch", plus "flash_attn" when it imports).

Tolerances: fp32 atol 1e-5 (through the fakes, which compute in fp32 like the reference; on a
GPU fp32 takes the exact reference path: atol = rtol = 1e-5, GPU vs CPU summation order);
bf16 atol = rtol = 2e-2 for outputs / lse and 3e-2 for gradients on the GPU (bf16
probabilities inside the kernel; Transformer Engine's CP tests use 2.5e-2 / 3.5e-2), 2e-2
through the fakes; the long multi-block GPU case uses flash-attn's own criterion (error at
most twice that of naive bf16 attention, against an fp64 result).
"""
import dataclasses
import math
import sys
import warnings

import pytest
import torch

from tests.backends.attention_checks import assert_autograd_matches_reference, randn
import backends.cuda as cuda_module
from backends import backend_options_for, reference
from backends.attention_params import AttentionParams
from backends.base import BackendUnavailableError
from backends.cpu import CPUBackend
from backends.cuda import CUDABackend
from backends.cuda_kernels import FlashAttnKernels
from backends.fakes.flash_fake import FakeAtenFlash, fake_flash_attn_modules, varlen_forward
from backends.npu import NPUBackend

FP32_TOL = dict(atol=1e-5, rtol=0)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
GPU_FP32_TOL = dict(atol=1e-5, rtol=1e-5)
GPU_BF16_GRAD_TOL = dict(atol=3e-2, rtol=3e-2)


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


# case id -> (q shape, kv shape, causal, packed q lengths, packed kv lengths)
CASES = {
    "dense_causal": ((2, 24, 2, 16), (2, 24, 2, 16), True, None, None),
    "dense_full": ((2, 24, 2, 32), (2, 24, 2, 32), False, None, None),
    "dense_full_q_shorter": ((1, 12, 2, 16), (1, 40, 2, 16), False, None, None),
    "dense_causal_q_shorter": ((2, 12, 2, 16), (2, 40, 2, 16), True, None, None),
    "dense_causal_q_longer": ((2, 40, 4, 16), (2, 12, 2, 16), True, None, None),
    "gqa_causal": ((2, 20, 4, 16), (2, 20, 2, 16), True, None, None),
    "packed_causal_gqa": ((39, 4, 16), (39, 2, 16), True, [5, 17, 1, 16], None),
    "packed_full": ((30, 2, 32), (30, 2, 32), False, [7, 3, 20], None),
    # unequal per-sequence lengths, one sequence without keys (its rows are fully masked)
    "packed_causal_unequal": ((20, 4, 16), (19, 2, 16), True, [3, 5, 6, 6], [0, 8, 4, 7]),
    "packed_full_unequal": ((20, 4, 16), (19, 2, 16), False, [3, 5, 6, 6], [0, 8, 4, 7]),
}


def _case_tensors(case, dtype, head_dim=None):
    q_shape, kv_shape, causal, lengths_q, lengths_kv = CASES[case]
    if head_dim is not None:
        q_shape, kv_shape = q_shape[:-1] + (head_dim,), kv_shape[:-1] + (head_dim,)
    q = randn(*q_shape, seed=1, dtype=dtype)
    k, v = randn(*kv_shape, seed=2, dtype=dtype), randn(*kv_shape, seed=3, dtype=dtype)
    dout = randn(*q_shape, seed=4, dtype=dtype)
    mask = "causal" if causal else "none"
    if lengths_q is None:
        return q, k, v, dout, AttentionParams.dense(mask)
    cu_q = _cu(lengths_q).tolist()
    cu_kv = None if lengths_kv is None else _cu(lengths_kv).tolist()
    return q, k, v, dout, AttentionParams.packed(cu_q, cu_kv, mask=mask)


def _params_to(params, to_device):
    """`params` with its cumulative-length tensors moved by `to_device` (host tuples kept)."""
    if not params.is_packed:
        return params
    cu_q = to_device(params.cu_seqlens_q)
    same = params.cu_seqlens_kv is params.cu_seqlens_q
    return dataclasses.replace(params, cu_seqlens_q=cu_q,
                               cu_seqlens_kv=cu_q if same else to_device(params.cu_seqlens_kv))


def _check_parity(backend, reference_backend, q, k, v, dout, params, tol, grad_tol, to_device):
    """Forward vs the reference backend, then backward for the reference (out, lse) and for a
    perturbed pair, as a ring merge hands it over (the backward must use the GIVEN stats)."""
    dev = [to_device(t) for t in (q, k, v, dout)]
    dev_params = _params_to(params, to_device)
    out, lse = backend.attention_forward(*dev[:3], dev_params)
    ref_out, ref_lse = reference_backend.attention_forward(q, k, v, params)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), **tol)
    torch.testing.assert_close(lse.cpu(), ref_lse, **tol)  # -inf rows must match exactly
    finite = torch.isfinite(ref_lse)
    shift = torch.where(finite, 0.3 * randn(*ref_lse.shape, seed=5), torch.zeros(()))
    merged_out = (0.8 * ref_out.float() + 0.1 * randn(*ref_out.shape, seed=6)).to(q.dtype)
    for given_out, given_lse in ((ref_out, ref_lse), (merged_out, ref_lse + shift)):
        grads = backend.attention_backward(dev[3], *dev[:3], to_device(given_out),
                                           to_device(given_lse), dev_params)
        ref_grads = reference_backend.attention_backward(dout, q, k, v, given_out, given_lse,
                                                         params)
        for got, expected, like in zip(grads, ref_grads, (q, k, v)):
            assert got.shape == like.shape and got.dtype == like.dtype
            torch.testing.assert_close(got.float().cpu(), expected.float(), **grad_tol)
    return out, lse


# ================================================================ CPU: the fakes are faithful
def test_fake_aten_kernels_have_the_schema_of_the_installed_torch():
    import inspect

    for op_name in ("_flash_attention_forward", "_flash_attention_backward"):
        schema = getattr(torch.ops.aten, op_name).default._schema
        params = inspect.signature(getattr(FakeAtenFlash(), op_name)).parameters
        assert [(a.name, a.kwarg_only) for a in schema.arguments] == [
            (name, p.kind == inspect.Parameter.KEYWORD_ONLY) for name, p in params.items()]


def test_fake_kernel_is_flash_attention_bottom_right_causal():
    """The fake must have the real kernels' causal alignment, or the wrapper tests prove nothing:
    with s_q = 2 and s_kv = 5, row 0 sees keys 0..3 and row 1 all 5 (flash-attn's docstring);
    with s_q = 5 and s_kv = 2, rows 0..2 see nothing (output 0, lse +inf)."""
    q, k, v = randn(2, 1, 8, seed=0), randn(5, 1, 8, seed=1), randn(5, 1, 8, seed=2)
    out, lse = varlen_forward(q, k, v, _cu([2]), _cu([5]), 2, 5, 0.5, True, allow_fp32=True)
    full = AttentionParams.dense("none", scale=0.5)
    row0, lse0 = reference.attention_reference(q[None, :1], k[None, :4], v[None, :4], full)
    row1, lse1 = reference.attention_reference(q[None, 1:], k[None], v[None], full)
    torch.testing.assert_close(out, torch.cat([row0[0], row1[0]]), **FP32_TOL)
    torch.testing.assert_close(lse, torch.cat([lse0[0], lse1[0]], dim=-1), **FP32_TOL)

    q, k, v = randn(5, 1, 8, seed=3), randn(2, 1, 8, seed=4), randn(2, 1, 8, seed=5)
    out, lse = varlen_forward(q, k, v, _cu([5]), _cu([2]), 5, 2, 0.5, True, allow_fp32=True)
    assert torch.equal(out[:3], torch.zeros(3, 1, 8)) and torch.all(lse[:, :3] == math.inf)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        varlen_forward(q, k, v, _cu([5]), _cu([2]), 5, 2, 0.5, True)


# ===================================================================== CPU: helper logic
@pytest.mark.parametrize("q_shape,kv_shape,v_dim,dtype,reason", [
    ((4, 2, 64), (4, 2, 64), 64, torch.bfloat16, None),
    ((4, 8, 128), (4, 2, 128), 128, torch.float16, None),
    ((4, 2, 256), (4, 2, 256), 256, torch.bfloat16, None),
    ((4, 2, 64), (4, 2, 64), 64, torch.float32, "dtype torch.float32"),
    ((4, 2, 20), (4, 2, 20), 20, torch.bfloat16, "head_dim 20"),
    ((4, 2, 264), (4, 2, 264), 264, torch.bfloat16, "head_dim 264"),
    ((4, 2, 64), (4, 2, 64), 32, torch.bfloat16, "head dims q 64, k 64, v 32"),
    ((4, 6, 64), (4, 4, 64), 64, torch.bfloat16, "6 query heads for 4 key"),
])
def test_flash_fallback_decision(monkeypatch, q_shape, kv_shape, v_dim, dtype, reason):
    monkeypatch.setattr(cuda_module, "_device_reason", lambda device: None)
    q, k = torch.zeros(q_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)
    v = torch.zeros(kv_shape[:-1] + (v_dim,), dtype=dtype)
    got = cuda_module._flash_unsupported_reason(q, k, v)
    if reason is None:
        assert got is None and cuda_module._flash_supported(q, k, v)
    else:
        assert reason in got and not cuda_module._flash_supported(q, k, v)


def test_flash_fallback_on_device(monkeypatch):
    assert "tensors on cpu" in cuda_module._device_reason(torch.device("cpu"))
    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cc"])
    for cc, ok in (((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)):
        capability["cc"] = cc
        reason = cuda_module._device_reason(torch.device("cuda", 0))
        assert (reason is None) == ok
        if not ok:
            assert f"compute capability {cc[0]}.{cc[1]}" in reason
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)  # a CPU tensor: never the flash kernels
    assert "tensors on cpu" in cuda_module._flash_unsupported_reason(q, q, q)


def _tensor_params(mask, cu_q, cu_kv=None, max_q=None, max_kv=None):
    """Params carrying device tensors only (no host tuples), as a caller without them passes."""
    return AttentionParams(mask=mask, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, max_seqlen_q=max_q,
                           max_seqlen_kv=max_kv)


def test_packed_cu_seqlens_conversion_and_when_lengths_are_read(monkeypatch):
    q = randn(9, 2, 8, seed=0)
    cu64 = torch.tensor([0, 4, 4, 9], dtype=torch.int64)
    p = cuda_module._to_varlen(q, q, q, _tensor_params("causal", cu64))
    assert p.cu_q.dtype == torch.int32 and p.cu_q.tolist() == [0, 4, 4, 9] and p.cu_kv is p.cu_q
    assert (p.max_q, p.max_kv, p.lengths_q) == (5, 5, [4, 0, 5])

    calls = []
    real = cuda_module._host_lengths
    monkeypatch.setattr(cuda_module, "_host_lengths",
                        lambda cu, name: calls.append(name) or real(cu, name))
    cu = _cu([4, 5])
    # megatron's case: one cu_seqlens tensor for q and kv, max_seqlen given -> no device sync
    p = cuda_module._to_varlen(q, q, q, _tensor_params("causal", cu, cu, 5, 5))
    assert calls == [] and p.lengths_q is None and (p.max_q, p.max_kv) == (5, 5)
    # distinct tensors: non-causal and bottom-right need no lengths, top-left causal reads them
    cuda_module._to_varlen(q, q, q, _tensor_params("none", cu, cu.clone(), 5, 5))
    cuda_module._to_varlen(q, q, q, _tensor_params("causal_bottom_right", cu, cu.clone(), 5, 5))
    assert calls == []
    p = cuda_module._to_varlen(q, q, q, _tensor_params("causal", cu, cu.clone(), 5, 5))
    assert calls == ["cu_seqlens_q", "cu_seqlens_kv"] and p.lengths_q == p.lengths_kv == [4, 5]
    # host tuples given: lengths known without reading any tensor
    p = cuda_module._to_varlen(q, q, q, AttentionParams.packed([0, 4, 9], [0, 5, 9], mask="causal"))
    assert calls == ["cu_seqlens_q", "cu_seqlens_kv"]  # unchanged: nothing read
    assert (p.lengths_q, p.lengths_kv) == ([4, 5], [5, 4])

    with pytest.raises(ValueError, match="start at 0"):
        cuda_module._to_varlen(q, q, q, _tensor_params("none", torch.tensor([4, 9])))
    with pytest.raises(ValueError, match="same"):
        cuda_module._to_varlen(q, q, q, _tensor_params("none", cu, _cu([9])))
    with pytest.raises(ValueError, match=r"packed attention expects \[t, n, d\]"):
        cuda_module._to_varlen(q[None], q, q, _tensor_params("none", cu))


def test_top_left_causal_pieces_rows():
    lengths_q, lengths_kv = [3, 5, 0, 6], [0, 6, 3, 4]
    square, beyond = cuda_module._top_left_causal_pieces(lengths_q, lengths_kv, "cpu")
    # sequence 0 has no keys (rows 0..2 in no piece); sequence 2 has no queries
    assert square.causal and square.q_rows.tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert square.kv_rows.tolist() == [0, 1, 2, 3, 4, 9, 10, 11, 12]
    assert square.cu_q.tolist() == square.cu_kv.tolist() == [0, 5, 9]
    assert (square.max_q, square.max_kv) == (5, 5)
    assert not beyond.causal and beyond.q_rows.tolist() == [12, 13]
    assert beyond.kv_rows.tolist() == [9, 10, 11, 12]
    assert beyond.cu_q.tolist() == [0, 2] and beyond.cu_kv.tolist() == [0, 4]


@pytest.mark.parametrize("seed", range(5))
def test_top_left_causal_pieces_cover_exactly_the_top_left_mask(seed):
    """Each piece's kernel mask (bottom-right causal or none) mapped back to global rows must
    add up to the top-left causal mask of every sequence, each (query, key) pair once."""
    g = torch.Generator().manual_seed(seed)
    lengths_q = torch.randint(0, 7, (5,), generator=g).tolist()
    lengths_kv = torch.randint(0, 7, (5,), generator=g).tolist()
    t_q, t_kv = sum(lengths_q), sum(lengths_kv)
    expected = torch.zeros(t_q, t_kv, dtype=torch.int64)
    cq = ck = 0
    for s_q, s_kv in zip(lengths_q, lengths_kv):
        i, j = torch.arange(s_q)[:, None], torch.arange(s_kv)[None, :]
        expected[cq:cq + s_q, ck:ck + s_kv] = (j <= i).long()
        cq, ck = cq + s_q, ck + s_kv
    covered = torch.zeros_like(expected)
    for piece in cuda_module._top_left_causal_pieces(lengths_q, lengths_kv, "cpu"):
        pq = [b - a for a, b in zip(piece.cu_q.tolist(), piece.cu_q.tolist()[1:])]
        pk = [b - a for a, b in zip(piece.cu_kv.tolist(), piece.cu_kv.tolist()[1:])]
        oq = ok = 0
        for s_q, s_kv in zip(pq, pk):
            i, j = torch.arange(s_q)[:, None], torch.arange(s_kv)[None, :]
            keep = (j <= i + s_kv - s_q) if piece.causal else torch.ones(s_q, s_kv).bool()
            rows, cols = piece.q_rows[oq:oq + s_q], piece.kv_rows[ok:ok + s_kv]
            covered[rows[:, None], cols[None, :]] += keep.long()
            oq, ok = oq + s_q, ok + s_kv
    assert torch.equal(covered, expected)


def test_lse_layout_conversions():
    cu = _cu([3, 0, 2])
    packed = torch.tensor([[1.0, 2.0, 3.0, 4.0, -math.inf], [5.0, 6.0, 7.0, 8.0, 9.0]])
    padded = cuda_module._lse_packed_to_padded(packed, cu, 3)
    assert padded.shape == (3, 2, 3)
    assert padded[0].tolist() == [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]
    assert padded[2, :, :2].tolist() == [[4.0, -math.inf], [8.0, 9.0]]
    assert torch.equal(cuda_module._lse_padded_to_packed(padded, cu, 5), packed)
    kernel = cuda_module._lse_for_kernel(packed)
    assert kernel[0, 4] == math.inf and kernel.is_contiguous() and kernel.dtype == torch.float32
    assert torch.equal(cuda_module._lse_from_kernel(kernel), packed)


def test_device_is_the_current_cuda_device(monkeypatch):
    """`device()` follows `set_device` (LOCAL_RANK), so rank r of a node uses GPU r."""
    current = {"index": 0}
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: current.update(index=int(index)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    backend = CUDABackend()
    assert backend.device() == torch.device("cuda", 0)
    backend.set_device(1)
    assert backend.device() == torch.device("cuda", 1)
    assert backend.device(3) == torch.device("cuda", 3)  # the explicit form still works


def test_backend_options_go_to_the_backend_that_takes_them():
    options = {"use_mindspeed": True, "attention_impl": "torch"}
    assert backend_options_for(CPUBackend, options) == {}
    assert backend_options_for(CUDABackend, options) == {"attention_impl": "torch"}
    assert backend_options_for(NPUBackend, options) == {"use_mindspeed": True}
    with pytest.raises(BackendUnavailableError, match="'attention_kernel'"):
        backend_options_for(CUDABackend, {"attention_kernel": "torch"})
    with pytest.raises(BackendUnavailableError, match="attention_impl='flash'"):
        CUDABackend(attention_impl="flash")


# ============================================= CPU: the backend driving the fake kernels
@pytest.fixture()
def kernel_path(monkeypatch):
    """Let CPU tensors (and fp32, for exact checks) take the kernel path, through fakes."""
    monkeypatch.setattr(cuda_module, "_device_reason", lambda device: None)
    monkeypatch.setattr(cuda_module, "_FLASH_DTYPES",
                        (torch.float16, torch.bfloat16, torch.float32))


def _fake_backend(lse_layout="packed", impl="torch"):
    backend = CUDABackend(attention_impl=impl)
    backend._aten = FakeAtenFlash(lse_layout, allow_fp32=True)
    return backend


@pytest.mark.parametrize("lse_layout", ["packed", "padded"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_backend_on_fake_kernels_matches_cpu_backend(kernel_path, case, dtype, tol, lse_layout):
    backend = _fake_backend(lse_layout)
    q, k, v, dout, params = _case_tensors(case, dtype)
    _check_parity(backend, CPUBackend(), q, k, v, dout, params, tol, tol, lambda t: t)
    fake = backend._aten
    assert fake.forward_calls and fake.backward_calls  # the kernels ran, not the fallback
    for call in fake.forward_calls + fake.backward_calls:
        if call["is_causal"]:  # the kernels' causal is bottom-right: only ever used when square
            assert call["cum_seq_q"] == call["cum_seq_k"]


def test_fully_masked_rows_are_zero_with_lse_minus_inf(kernel_path):
    backend = _fake_backend()
    q, k, v, dout, params = _case_tensors("packed_full_unequal", torch.float32)
    out, lse = backend.attention_forward(q, k, v, params)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))  # sequence 0 has no keys
    assert torch.all(lse[:, :3] == -math.inf) and torch.isfinite(lse[:, 3:]).all()
    dq, dk, dv = backend.attention_backward(dout, q, k, v, out, lse, params)
    assert torch.equal(dq[:3], torch.zeros_like(dq[:3])) and torch.isfinite(dq).all()


def test_packed_causal_with_one_cu_seqlens_tensor_never_syncs(kernel_path, monkeypatch):
    monkeypatch.setattr(cuda_module, "_host_lengths",
                        lambda *args: pytest.fail("host lengths read (device sync)"))
    backend = _fake_backend()
    q, k, v, dout, params = _case_tensors("packed_causal_gqa", torch.float32)
    params = _tensor_params("causal", params.cu_seqlens_q, params.cu_seqlens_q, 17, 17)
    out, lse = backend.attention_forward(q, k, v, params)
    backend.attention_backward(dout, q, k, v, out, lse, params)


def test_backward_first_probes_the_lse_layout(kernel_path):
    """A ring backward can come before any forward in the process: the lse layout is probed."""
    backend = _fake_backend("padded")
    q, k, v, dout, params = _case_tensors("packed_causal_gqa", torch.float32)
    ref_out, ref_lse = CPUBackend().attention_forward(q, k, v, params)
    grads = backend.attention_backward(dout, q, k, v, ref_out, ref_lse, params)
    ref_grads = CPUBackend().attention_backward(dout, q, k, v, ref_out, ref_lse, params)
    assert backend._kernels().lse_padded is True and len(backend._aten.forward_calls) == 1
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, **FP32_TOL)


@pytest.mark.parametrize("case", ["dense_causal_q_longer", "packed_causal_unequal", "gqa_causal"])
def test_autograd_through_fake_kernels_matches_reference_autograd(kernel_path, case):
    backend = _fake_backend()
    q, k, v, dout, params = _case_tensors(case, torch.float32)
    assert_autograd_matches_reference(backend, q, k, v, dout, params, FP32_TOL)


def test_unsupported_inputs_use_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(cuda_module, "_device_reason", lambda device: None)
    backend = _fake_backend()
    q, k, v, dout, params = _case_tensors("gqa_causal", torch.float32)
    with pytest.warns(UserWarning, match="flash kernels cannot take dtype torch.float32"):
        out, lse = backend.attention_forward(q, k, v, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason does not warn twice
        grads = backend.attention_backward(dout, q, k, v, out, lse, params)
    assert backend._aten.forward_calls == [] and backend._aten.backward_calls == []
    ref_out, ref_lse = reference.attention_reference(q, k, v, params)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    for got, expected in zip(grads, reference.attention_backward_reference(
            dout, q, k, v, out, lse, params)):
        torch.testing.assert_close(got, expected, **FP32_TOL)


# ====================================================== CPU: binding the flash-attn package
def _install_flash_attn(monkeypatch, style, extra=None):
    modules = fake_flash_attn_modules(style, allow_fp32=True, extra=extra)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["flash_attn.flash_attn_interface"]


@pytest.mark.parametrize("impl", ["auto", "flash_attn"])
@pytest.mark.parametrize("style", ["2.6", "2.7"])
@pytest.mark.parametrize("case", ["packed_causal_unequal", "dense_causal", "packed_full"])
def test_flash_attn_package_signatures_bind_and_match(kernel_path, monkeypatch, style, impl, case):
    interface = _install_flash_attn(monkeypatch, style)
    backend = _fake_backend(impl=impl)
    q, k, v, dout, params = _case_tensors(case, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_parity(backend, CPUBackend(), q, k, v, dout, params, FP32_TOL, FP32_TOL,
                      lambda t: t)
    assert backend._kernels().name == "flash_attn"
    form = "" if params.is_packed else "dense_"  # dense input takes the dense functions
    assert set(interface.calls) == {form + "forward", form + "backward"}
    assert backend._aten.forward_calls == []  # PyTorch's kernels were not used


def test_flash_attn_with_an_extra_optional_parameter_still_binds(kernel_path, monkeypatch):
    _install_flash_attn(monkeypatch, "2.7", extra="optional")
    backend = _fake_backend(impl="flash_attn")
    q, k, v, dout, params = _case_tensors("gqa_causal", torch.float32)
    _check_parity(backend, CPUBackend(), q, k, v, dout, params, FP32_TOL, FP32_TOL, lambda t: t)


def test_flash_attn_signature_drift(kernel_path, monkeypatch):
    _install_flash_attn(monkeypatch, "2.7", extra="required")
    q, k, v, dout, params = _case_tensors("gqa_causal", torch.float32)
    with pytest.raises(BackendUnavailableError, match="needs parameter 'sink_tokens'"):
        _fake_backend(impl="flash_attn").attention_forward(q, k, v, params)
    backend = _fake_backend(impl="auto")
    with pytest.warns(UserWarning, match="flash-attn 9.9.9.*'sink_tokens'.*PyTorch's own flash"):
        out, lse = backend.attention_forward(q, k, v, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.attention_forward(q, k, v, params)  # warned once
    assert backend._kernels().name == "torch" and len(backend._aten.forward_calls) == 2
    torch.testing.assert_close(out, CPUBackend().attention_forward(q, k, v, params)[0],
                               **FP32_TOL)


def test_flash_attn_missing(kernel_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails like a missing package
    q, k, v, dout, params = _case_tensors("dense_causal", torch.float32)
    with pytest.raises(BackendUnavailableError,
                       match="not installed; pip install flash-attn --no-build-isolation"):
        _fake_backend(impl="flash_attn").attention_forward(q, k, v, params)
    backend = _fake_backend(impl="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an optional package that is absent: no warning
        backend.attention_forward(q, k, v, params)
    assert backend._kernels().name == "torch"


def test_flash_attn_broken_build_falls_back_with_one_warning(kernel_path, monkeypatch, tmp_path):
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.flash_attn_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    q, k, v, dout, params = _case_tensors("dense_causal", torch.float32)
    backend = _fake_backend(impl="auto")
    with pytest.warns(UserWarning, match="installed but does not import.*undefined symbol"):
        backend.attention_forward(q, k, v, params)
    assert backend._kernels().name == "torch"
    with pytest.raises(BackendUnavailableError, match="undefined symbol"):
        _fake_backend(impl="flash_attn").attention_forward(q, k, v, params)


# ================================================================= GPU: real CUDA kernels
def _gpu_impls():
    """torch, plus flash_attn when its compiled kernels load and bind (a build for another
    torch is found by importlib but fails to load: ci/run_gpu_tests.sh reports why)."""
    impls = ["torch"]
    try:
        FlashAttnKernels.load()
    except Exception:  # noqa: BLE001 - absent or unusable: the torch kernels only
        return impls
    return impls + ["flash_attn"]


@pytest.fixture(params=_gpu_impls())
def gpu_backend(request):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need an NVIDIA GPU; run them with ci/run_gpu_tests.sh on a "
                    "GPU host (CPU CI deselects them with -m 'not gpu')")
    return CUDABackend(attention_impl=request.param)


def _to_cuda(t):
    return t.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_attention_forward_and_backward_match_cpu_backend(gpu_backend, case, dtype):
    if dtype == torch.float32:  # the exact reference path, on the GPU
        q, k, v, dout, params = _case_tensors(case, dtype)
        _check_parity(gpu_backend, CPUBackend(), q, k, v, dout, params, GPU_FP32_TOL,
                      GPU_FP32_TOL, _to_cuda)
        return
    q, k, v, dout, params = _case_tensors(case, dtype, head_dim=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bf16 with head_dim 64 must take the flash kernels
        _check_parity(gpu_backend, CPUBackend(), q, k, v, dout, params, BF16_TOL,
                      GPU_BF16_GRAD_TOL, _to_cuda)


@pytest.mark.gpu
def test_gpu_lse_layout_and_fully_masked_rows(gpu_backend):
    q, k, v, dout, params = _case_tensors("packed_full_unequal", torch.bfloat16, head_dim=64)
    q, k, v, dout = (t.cuda() for t in (q, k, v, dout))
    params = _params_to(params, _to_cuda)
    out, lse = gpu_backend.attention_forward(q, k, v, params)
    assert gpu_backend._kernels().lse_padded is False  # PyTorch 2.13 / flash-attn >= 2.6: [n, t]
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))  # sequence 0 has no keys
    assert torch.all(lse[:, :3] == -math.inf) and torch.isfinite(lse[:, 3:]).all()
    dq, dk, dv = gpu_backend.attention_backward(dout, q, k, v, out, lse, params)
    assert torch.equal(dq[:3], torch.zeros_like(dq[:3]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.gpu
def test_gpu_long_packed_causal_matches_reference(gpu_backend):
    """Several kernel blocks per sequence (lengths up to 700, blocks of 64-128 rows), checked
    the way flash-attn's own tests do: the kernel's error against the exact result is at most
    twice that of a naive attention computed entirely in bf16."""
    lengths = [700, 129, 1, 300]
    t, n_q, n_kv, d = sum(lengths), 8, 2, 128
    q, k, v = (randn(t, n, d, seed=s, dtype=torch.bfloat16)
               for s, n in ((1, n_q), (2, n_kv), (3, n_kv)))
    dout = randn(t, n_q, d, seed=4, dtype=torch.bfloat16)
    leaves = [x.clone().cuda().requires_grad_(True) for x in (q, k, v)]
    params = AttentionParams.packed(_cu(lengths).tolist(), mask="causal", device="cuda")
    out = gpu_backend.attention(*leaves, params)
    out.backward(dout.cuda())

    def naive(q, k, v):  # every op in q's dtype, per sequence
        outs = []
        for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            ke, ve = (x.repeat_interleave(n_q // n_kv, dim=1) for x in (ks, vs))
            s = torch.einsum("qhd,khd->hqk", qs, ke) / math.sqrt(d)
            mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
            p = s.masked_fill(mask, float("-inf")).softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", p, ve))
        return torch.cat(outs)

    exact_leaves = [x.clone().cuda().double().requires_grad_(True) for x in (q, k, v)]
    exact = naive(*exact_leaves)
    exact.backward(dout.cuda().double())
    naive_leaves = [x.clone().cuda().requires_grad_(True) for x in (q, k, v)]
    approx = naive(*naive_leaves)
    approx.backward(dout.cuda())
    pairs = [(out, approx, exact)] + [(a.grad, b.grad, c.grad) for a, b, c in
                                      zip(leaves, naive_leaves, exact_leaves)]
    for got, naive_bf16, reference_value in pairs:
        err = (got.double() - reference_value).abs().max().item()
        naive_err = (naive_bf16.double() - reference_value).abs().max().item()
        assert err <= 2 * naive_err + 1e-3, (err, naive_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)],
                         ids=["fp32", "bf16"])
def test_gpu_fused_layers_match_cpu_forward_and_backward(gpu_backend, dtype, tol):
    cpu = CPUBackend()
    x = randn(3, 5, 64, seed=0, dtype=dtype)
    w = (1 + 0.1 * randn(64, seed=1)).to(dtype)
    angles = randn(5, 1, 64, seed=2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    x4 = randn(2, 5, 3, 64, seed=3, dtype=dtype)
    swiglu_input = randn(4, 6, 128, seed=4, dtype=dtype).transpose(0, 1)  # non-contiguous
    cases = [
        (lambda b, a, extra: b.rms_norm(a, extra[0], 1e-6), x, (w,)),
        (lambda b, a, extra: b.apply_rotary(a, *extra), x4, (cos, sin)),
        (lambda b, a, extra: b.swiglu(a), swiglu_input, ()),
    ]
    for fn, a, extra in cases:
        a_gpu = a.detach().cuda().requires_grad_(True)
        a_cpu = a.detach().clone().requires_grad_(True)
        out = fn(gpu_backend, a_gpu, tuple(e.cuda() for e in extra))
        ref = fn(cpu, a_cpu, extra)
        assert out.dtype == ref.dtype and out.is_cuda
        torch.testing.assert_close(out.float().cpu(), ref.float(), **tol)
        dy = randn(*ref.shape, seed=5, dtype=ref.dtype)
        out.backward(dy.cuda())
        ref.backward(dy)
        torch.testing.assert_close(a_gpu.grad.float().cpu(), a_cpu.grad.float(), **tol)


@pytest.mark.gpu
def test_gpu_attention_makes_no_host_sync(gpu_backend):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call: none in a
    dense (megatron's transposed views), ViT (unbind views), packed (host lengths, also
    bottom-right with other kv lengths) or decode attention, forward or backward."""
    def rnd(*shape, seed):
        return randn(*shape, seed=seed, dtype=torch.bfloat16).cuda()

    q_sbhd, kv_sbhd = rnd(64, 2, 8, 64, seed=1), rnd(64, 2, 2, 128, seed=2)
    k_sbhd, v_sbhd = kv_sbhd.split(64, dim=-1)
    qkv = rnd(3, 65, 3, 4, 64, seed=3)
    packed_q, packed_k, packed_v = rnd(96, 8, 64, seed=4), rnd(96, 2, 64, seed=5), \
        rnd(96, 2, 64, seed=6)
    calls = [
        ((q_sbhd.transpose(0, 1), k_sbhd.transpose(0, 1), v_sbhd.transpose(0, 1)),
         AttentionParams.dense("causal")),
        (qkv.unbind(2), AttentionParams.dense("none")),
        ((packed_q, packed_k, packed_v),
         AttentionParams.packed([0, 32, 40, 96], mask="causal", device="cuda")),
        ((packed_q, packed_k, packed_v),
         AttentionParams.packed([0, 32, 40, 96], [0, 40, 48, 96], mask="causal_bottom_right",
                                device="cuda")),
        ((packed_q[:3], packed_k, packed_v),  # one decode step of three sequences
         AttentionParams.packed([0, 1, 2, 3], [0, 40, 48, 96], mask="causal_bottom_right",
                                device="cuda")),
    ]
    for (q, k, v), params in calls:
        gpu_backend.attention_forward(q, k, v, params)  # warm: kernel binding, lse probe
        out, lse = gpu_backend.attention_forward(q, k, v, params)
        gpu_backend.attention_backward(torch.ones_like(out), q, k, v, out, lse, params)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, lse = gpu_backend.attention_forward(q, k, v, params)
            gpu_backend.attention_backward(torch.ones_like(out), q, k, v, out, lse, params)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_repeatable(gpu_backend):
    """torch.use_deterministic_algorithms(True) reaches the kernels' backward (PyTorch's reads
    it itself, flash-attn's gets it from the backend): two backwards agree bit for bit, also
    through the top-left split (s_q != s_kv) whose dk / dv are accumulated."""
    q, k, v = (randn(t, n, 64, seed=s, dtype=torch.bfloat16).cuda()
               for s, t, n in ((1, 1536, 8), (2, 1536, 2), (3, 1536, 2)))
    dout = randn(1536, 8, 64, seed=4, dtype=torch.bfloat16).cuda()
    for params in (AttentionParams.packed([0, 512, 1536], mask="causal", device="cuda"),
                   AttentionParams.packed([0, 512, 1536], [0, 256, 1536], mask="causal",
                                          device="cuda")):
        out, lse = gpu_backend.attention_forward(q, k, v, params)
        torch.use_deterministic_algorithms(True)
        try:
            first = gpu_backend.attention_backward(dout, q, k, v, out, lse, params)
            second = gpu_backend.attention_backward(dout, q, k, v, out, lse, params)
        finally:
            torch.use_deterministic_algorithms(False)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
def test_gpu_runtime(gpu_backend):
    gpu_backend.set_device(0)
    assert gpu_backend.device() == torch.device("cuda", torch.cuda.current_device()) == \
        torch.device("cuda", 0)
    gpu_backend.seed(5)
    gpu_backend.reset_peak_memory_stats()
    x = torch.ones(1 << 20, device=gpu_backend.device())
    gpu_backend.synchronize()
    assert gpu_backend.max_memory_allocated() >= x.numel() * 4
    assert gpu_backend.describe()["attention_kernels"] == gpu_backend.attention_impl


# ================================== CPU: no host syncs, no copies of views, edge cases (issue 12)
_BACKEND_FILES = ("backends/cuda.py", "backends/cuda_kernels.py")


class _HostSyncSpy:
    """Counts what backends/cuda*.py does that needs the host to wait for the device or copy
    host values to it: tensors built from host lists (`torch.tensor` / `as_tensor`), values
    read back (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()` / `int()` / `float()`
    of a tensor). Calls made by the fakes or the tests are not counted (caller's file)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for owner, names in ((torch, ("tensor", "as_tensor")),
                             (torch.Tensor, ("item", "tolist", "cpu", "numpy", "__bool__",
                                             "__int__", "__float__", "__index__"))):
            for name in names:
                monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, fn, name):
        spy = self

        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if caller.endswith(_BACKEND_FILES):
                spy.calls.append(f"{name} in {caller.rsplit('/', 1)[-1]}")
            return fn(*args, **kwargs)
        return wrapped


@pytest.mark.parametrize("mask,q_len,kv_len", [
    ("causal", 24, 24), ("none", 12, 40), ("causal_bottom_right", 1, 30),
    ("causal", 40, 12), ("causal", 12, 40)])
def test_dense_attention_makes_no_host_sync_and_calls_the_dense_kernel(
        kernel_path, monkeypatch, mask, q_len, kv_len):
    """Dense [b, s, n, d] input: the kernels' dense form, no cu_seqlens built from host lists,
    nothing read back - in forward, backward and autograd through both (GQA, decode s_q = 1,
    top-left causal with s_q != s_kv split on slices)."""
    backend = _fake_backend()
    q, k, v = randn(2, q_len, 4, 16, seed=1), randn(2, kv_len, 2, 16, seed=2), \
        randn(2, kv_len, 2, 16, seed=3)
    dout = randn(2, q_len, 4, 16, seed=4)
    params = AttentionParams.dense(mask)
    ref_out, ref_lse = reference.attention_reference(q, k, v, params)
    spy = _HostSyncSpy(monkeypatch)
    out, lse = backend.attention_forward(q, k, v, params)
    grads = backend.attention_backward(dout, q, k, v, out, lse, params)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    backend.attention(*leaves, params).backward(dout)
    assert spy.calls == []
    monkeypatch.undo()  # the checks below may read values
    fake = backend._aten
    assert fake.forward_calls and all(c["dense"] for c in fake.forward_calls)
    assert fake.backward_calls and all(c["dense"] for c in fake.backward_calls)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)
    ref_grads = reference.attention_backward_reference(dout, q, k, v, ref_out, ref_lse, params)
    for got, autograd_got, expected in zip(grads, (t.grad for t in leaves), ref_grads):
        torch.testing.assert_close(got, expected, **FP32_TOL)
        torch.testing.assert_close(autograd_got, expected, **FP32_TOL)


@pytest.mark.parametrize("mask,lengths_kv", [
    ("causal", None), ("none", [9, 3, 20]), ("causal_bottom_right", [9, 3, 20])])
def test_packed_attention_with_host_lengths_makes_no_host_sync(kernel_path, monkeypatch, mask,
                                                              lengths_kv):
    backend = _fake_backend()
    lengths_q = [7, 3, 20]
    kv = lengths_kv or lengths_q
    q, k, v = randn(30, 4, 16, seed=1), randn(sum(kv), 2, 16, seed=2), \
        randn(sum(kv), 2, 16, seed=3)
    dout = randn(30, 4, 16, seed=4)
    params = AttentionParams.packed(_cu(lengths_q).tolist(), _cu(kv).tolist(), mask=mask)
    spy = _HostSyncSpy(monkeypatch)
    out, lse = backend.attention_forward(q, k, v, params)
    backend.attention_backward(dout, q, k, v, out, lse, params)
    assert spy.calls == []
    monkeypatch.undo()
    torch.testing.assert_close(out, reference.attention_reference(q, k, v, params)[0], **FP32_TOL)


def test_packed_top_left_split_reads_nothing_back(kernel_path, monkeypatch):
    """The split (top-left causal, s_q != s_kv) builds row indices from the host lengths - host
    tensors copied without blocking - and reads nothing back from the device."""
    backend = _fake_backend()
    q, k, v = randn(20, 4, 16, seed=1), randn(19, 2, 16, seed=2), randn(19, 2, 16, seed=3)
    params = AttentionParams.packed(_cu([3, 5, 6, 6]).tolist(), _cu([0, 8, 4, 7]).tolist(),
                                    mask="causal")
    spy = _HostSyncSpy(monkeypatch)
    out, lse = backend.attention_forward(q, k, v, params)
    backend.attention_backward(torch.ones_like(out), q, k, v, out, lse, params)
    reads = [c for c in spy.calls if not c.startswith(("tensor ", "as_tensor "))]
    assert reads == [] and spy.calls  # host-built index tensors only
    monkeypatch.undo()
    torch.testing.assert_close(out, reference.attention_reference(q, k, v, params)[0], **FP32_TOL)


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_strided_views_reach_the_kernels_uncopied(kernel_path):
    """The kernels need only stride(-1) == 1: the ViT's q/k/v (unbind views of one fused qkv),
    megatron's transposed [s, b, n, d] tensors and its split-view v go in as they are."""
    backend = _fake_backend()
    fake = backend._aten
    # ViT: dense, no mask, q/k/v unbind views of [tiles, tokens, 3, heads, dim]
    qkv = randn(3, 17, 3, 2, 16, seed=1)
    views = qkv.unbind(2)
    params = AttentionParams.dense("none")
    out, lse = backend.attention_forward(*views, params)
    backend.attention_backward(torch.ones_like(out), *views, out, lse, params)
    assert fake.forward_calls[-1]["storages"] == (_storage(qkv),) * 3
    assert fake.backward_calls[-1]["storages"][:3] == (_storage(qkv),) * 3
    # megatron: [s, b, n, d] tensors transposed to [b, s, n, d]; v a split view of fused kv
    q_sbhd = randn(20, 2, 4, 16, seed=2)
    kv_sbhd = randn(20, 2, 2, 32, seed=3)
    k_view, v_view = kv_sbhd.split(16, dim=-1)
    qv, kv_, vv = q_sbhd.transpose(0, 1), k_view.transpose(0, 1), v_view.transpose(0, 1)
    params = AttentionParams.dense("causal")
    out, lse = backend.attention_forward(qv, kv_, vv, params)
    backend.attention_backward(torch.ones_like(out), qv, kv_, vv, out, lse, params)
    expected = (_storage(q_sbhd), _storage(kv_sbhd), _storage(kv_sbhd))
    assert fake.forward_calls[-1]["storages"] == expected
    assert fake.backward_calls[-1]["storages"][:3] == expected
    # packed: unbind views of [t, 3, heads, dim]
    packed_qkv = randn(30, 3, 2, 16, seed=4)
    pq, pk, pv = packed_qkv.unbind(1)
    params = AttentionParams.packed(_cu([7, 3, 20]).tolist(), mask="causal")
    out, lse = backend.attention_forward(pq, pk, pv, params)
    backend.attention_backward(torch.ones_like(out), pq, pk, pv, out, lse, params)
    assert fake.forward_calls[-1]["storages"] == (_storage(packed_qkv),) * 3
    assert fake.backward_calls[-1]["storages"][:3] == (_storage(packed_qkv),) * 3
    ref, _ = reference.attention_reference(pq, pk, pv, params)
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("style", ["2.6", "2.7"])
def test_flash_attn_gets_views_uncopied_and_the_deterministic_flag(kernel_path, monkeypatch,
                                                                  style):
    interface = _install_flash_attn(monkeypatch, style)
    backend = _fake_backend(impl="flash_attn")
    dense_qkv, packed_qkv = randn(3, 17, 3, 2, 16, seed=1), randn(51, 3, 2, 16, seed=2)
    for fused, params in ((dense_qkv, AttentionParams.dense("causal")),
                          (packed_qkv, AttentionParams.packed([0, 17, 34, 51], mask="causal"))):
        views = fused.unbind(-3)
        out, lse = backend.attention_forward(*views, params)
        for flag in (False, True):
            torch.use_deterministic_algorithms(flag)
            try:
                backend.attention_backward(torch.ones_like(out), *views, out, lse, params)
            finally:
                torch.use_deterministic_algorithms(False)
            assert interface.records[-1]["deterministic"] is flag
        form = "" if params.is_packed else "dense_"
        assert [r["name"] for r in interface.records[-3:]] == [
            form + "forward", form + "backward", form + "backward"]
        assert all(r["storages"][:3] == (_storage(fused),) * 3 for r in interface.records[-3:])


def test_gqa_decode_with_an_empty_query_segment(kernel_path):
    """max_seqlen_q == 1 with GQA is the kernels' decode path, which assumes one query per
    sequence: a sequence without a new token must not reach it (the fake fails like the
    kernel)."""
    backend = _fake_backend()
    q, k, v = randn(2, 8, 16, seed=1), randn(12, 2, 16, seed=2), randn(12, 2, 16, seed=3)
    params = AttentionParams.packed([0, 1, 1, 2], [0, 5, 9, 12], mask="causal_bottom_right")
    out, lse = backend.attention_forward(q, k, v, params)
    ref_out, ref_lse = reference.attention_reference(q, k, v, params)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)
    with pytest.raises(RuntimeError, match="is invalid for input of size"):  # the fake is faithful
        backend._aten._flash_attention_forward(q, k, v, params.cu_seqlens_q, params.cu_seqlens_kv,
                                               1, 5, 0.0, False, False)
    full = AttentionParams.packed([0, 1, 2, 3], [0, 5, 9, 12], mask="causal_bottom_right")
    out, _ = backend.attention_forward(randn(3, 8, 16, seed=4), k, v, full)
    assert backend._aten.forward_calls[-1]["max_q"] == 1  # the decode path when it is safe


@pytest.fixture()
def half_kernels(monkeypatch):
    """CPU tensors take the kernel path; the kernel dtypes are the real ones (fp16 / bf16)."""
    monkeypatch.setattr(cuda_module, "_device_reason", lambda device: None)


def test_mixed_dtypes_run_the_kernels_in_the_half_dtype(half_kernels):
    """fp32 q/k (RoPE with fp32 cos/sin) and bf16 v: the kernels run in bf16 (one warning),
    out comes back in q's dtype and each gradient in its input's dtype."""
    backend = _fake_backend()
    q, k, v, dout, _ = _case_tensors("gqa_causal", torch.float32)
    v = v.bfloat16()
    params = AttentionParams.dense("causal")
    with pytest.warns(UserWarning, match="flash kernels run in torch.bfloat16"):
        out, lse = backend.attention_forward(q, k, v, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = backend.attention_backward(dout, q, k, v, out, lse, params)
    assert backend._aten.forward_calls and backend._aten.backward_calls  # not the reference
    assert out.dtype == torch.float32 and [g.dtype for g in grads] == [q.dtype, k.dtype, v.dtype]
    ref_out, ref_lse = reference.attention_reference(q, k, v.float(), params)
    torch.testing.assert_close(out, ref_out, **BF16_TOL)
    ref_grads = reference.attention_backward_reference(dout, q, k, v.float(), ref_out, ref_lse,
                                                       params)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), expected, atol=5e-2, rtol=5e-2)


def test_fp32_uses_the_reference_up_to_a_size_limit(half_kernels):
    """All-fp32 q/k/v: the exact reference (one warning) up to `reference_max_score_bytes` of
    scores per call, a clear error above. Under autocast too: autocast is off in the backward
    pass, and forward and backward must take the same path."""
    backend = _fake_backend()
    q, k, v, dout, _ = _case_tensors("dense_causal", torch.float32)  # scores: 2*2*24*24*4 B
    params = AttentionParams.dense("causal")
    backend.reference_max_score_bytes = 2 * 2 * 24 * 24 * 4
    with pytest.warns(UserWarning, match="reference attention"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = backend.attention_forward(q, k, v, params)
        ref_out, ref_lse = reference.attention_reference(q, k, v, params)
    grads = backend.attention_backward(dout, q, k, v, out, lse, params)
    assert backend._aten.forward_calls == [] and backend._aten.backward_calls == []
    torch.testing.assert_close(out, ref_out)
    for got, expected in zip(grads, reference.attention_backward_reference(
            dout, q, k, v, out, lse, params)):
        torch.testing.assert_close(got, expected)
    backend.reference_max_score_bytes -= 1
    with pytest.raises(ValueError, match=r"cannot take dtype torch.float32.*fp32 scores.*bf16"):
        backend.attention_forward(q, k, v, params)
    packed = AttentionParams.packed([0, 20, 30], mask="causal")  # longest: 2 * 20 * 20 * 4
    backend.reference_max_score_bytes = 2 * 20 * 20 * 4 - 1
    pq, pk, pv = (randn(30, 2, 16, seed=s) for s in (5, 6, 7))
    with pytest.raises(ValueError, match="fp32 scores"):
        backend.attention_forward(pq, pk, pv, packed)
    assert backend._aten.forward_calls == []
