"""AttentionParams, and every mask kind on every backend against the plain reference.

Backends: CPUBackend, NPUBackend on the torch_npu fake, CUDABackend on the flash-kernel fakes
(fp32 allowed so the comparison is exact). Cases: dense and packed, GQA, s_q != s_kv (the
bottom-right offset both ways) and rows that see no key. fp32 tolerance 1e-5.

The host-sync test patches the Python entry points of a device sync (`Tensor.item`, `tolist`,
`__int__`, `__float__`, `__bool__`, `__index__`) and of a host-built tensor (`torch.tensor`)
and counts calls made on behalf of backend code, for the packed and dense paths of the CPU and
NPU backends when the params carry their host tuples. A control case with tensor-only params
shows the counter does see the syncs it is meant to catch.
"""
import math
import os
import sys

import pytest
import torch

import backends.cuda as cuda_module
from backends import reference
from backends.attention_params import MASK_KINDS, AttentionParams, lengths_from_cu
from backends.cpu import CPUBackend
from backends.cuda import CUDABackend
from backends.fakes import FakeTorchNPU
from backends.fakes.flash_fake import FakeAtenFlash
from backends.npu import NPUBackend
from tests.backends.attention_checks import cu_seqlens, randn

TOL = dict(atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the object
def test_lengths_from_cu_and_its_errors():
    assert lengths_from_cu([0, 3, 3, 8]) == (3, 0, 5)
    assert lengths_from_cu((0,)) == ()
    for bad in ([], [1, 3], [0, 4, 2]):
        with pytest.raises(ValueError, match="start at 0 and be non-decreasing"):
            lengths_from_cu(bad)


def test_packed_builds_device_tensors_once_and_host_fields():
    p = AttentionParams.packed([0, 3, 8], mask="causal", scale=0.5)
    assert p.is_packed and p.mask == "causal" and p.scale == 0.5
    assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_q.tolist() == [0, 3, 8]
    assert p.cu_seqlens_kv is p.cu_seqlens_q  # one tensor when q and kv share sequences
    assert p.cu_seqlens_q_host == p.cu_seqlens_kv_host == (0, 3, 8)
    assert (p.max_seqlen_q, p.max_seqlen_kv) == (5, 5)
    assert p.seqlens_q() == p.seqlens_kv() == (3, 5)
    q = AttentionParams.packed(torch.tensor([0, 2, 4]), [0, 5, 6], mask="causal_bottom_right")
    assert q.seqlens_q() == (2, 2) and q.seqlens_kv() == (5, 1) and q.max_seqlens() == (2, 5)
    assert q.cu_seqlens_kv is not q.cu_seqlens_q and q.cu_seqlens_kv.tolist() == [0, 5, 6]
    r = q.with_mask("none")
    assert r.mask == "none" and r.cu_seqlens_q is q.cu_seqlens_q and q.mask == "causal_bottom_right"


def test_dense_and_validation():
    d = AttentionParams.dense()
    assert not d.is_packed and d.mask == "none" and d.scale is None
    assert AttentionParams.dense("causal", 0.1).mask == "causal"
    with pytest.raises(ValueError, match="choose one of none, causal, causal_bottom_right"):
        AttentionParams.dense("top_left")
    with pytest.raises(ValueError, match="same ones"):
        AttentionParams.packed([0, 2, 4], [0, 4], mask="none")
    with pytest.raises(ValueError, match="start at 0"):
        AttentionParams.packed([1, 4], mask="none")
    with pytest.raises(ValueError, match="without cu_seqlens_q"):
        AttentionParams(cu_seqlens_kv=torch.tensor([0, 1]))


def test_tensor_only_params_read_the_host_values_on_demand():
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    p = AttentionParams(mask="causal", cu_seqlens_q=cu)
    assert p.is_packed and p.seqlens_q() == p.seqlens_kv() == (4, 5) and p.max_seqlens() == (5, 5)
    assert p.device_cu_seqlens("cpu") == (cu, cu)


# --------------------------------------------------------- every mask kind, every backend
# case id -> (q shape, kv shape, packed q lengths, packed kv lengths)
CASES = {
    "dense_gqa": ((2, 12, 4, 16), (2, 12, 2, 16), None, None),
    "dense_q_shorter": ((2, 5, 4, 16), (2, 13, 2, 16), None, None),
    # bottom-right: the first 8 rows see no key
    "dense_q_longer": ((1, 13, 2, 16), (1, 5, 1, 16), None, None),
    "packed_gqa": ((25, 4, 16), (25, 2, 16), [5, 1, 12, 7], None),
    # sequence 0 has no keys; sequence 2 has more queries than keys (bottom-right: dead rows)
    "packed_unequal": ((20, 4, 16), (19, 2, 16), [3, 5, 6, 6], [0, 8, 4, 7]),
}


def _case(case, mask):
    q_shape, kv_shape, lengths_q, lengths_kv = CASES[case]
    q, k, v = randn(*q_shape, seed=1), randn(*kv_shape, seed=2), randn(*kv_shape, seed=3)
    dout = randn(*q_shape, seed=4)
    if lengths_q is None:
        return q, k, v, dout, AttentionParams.dense(mask)
    kv = None if lengths_kv is None else cu_seqlens(lengths_kv)
    return q, k, v, dout, AttentionParams.packed(cu_seqlens(lengths_q), kv, mask=mask)


def _cpu(monkeypatch):
    return CPUBackend()


def _npu(monkeypatch):
    return NPUBackend(torch_npu_module=FakeTorchNPU())


def _cuda(monkeypatch):
    monkeypatch.setattr(cuda_module, "_device_reason", lambda device: None)
    monkeypatch.setattr(cuda_module, "_FLASH_DTYPES",
                        (torch.float16, torch.bfloat16, torch.float32))
    backend = CUDABackend(attention_impl="torch")
    backend._aten = FakeAtenFlash("packed", allow_fp32=True)
    return backend


BACKENDS = {"cpu": _cpu, "npu_fake": _npu, "cuda_fake": _cuda}


def _has_dead_rows(case, mask):
    return mask == "causal_bottom_right" and case in ("dense_q_longer", "packed_unequal")


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend_name", list(BACKENDS))
def test_every_mask_kind_matches_the_reference(monkeypatch, backend_name, case, mask):
    backend = BACKENDS[backend_name](monkeypatch)
    q, k, v, dout, params = _case(case, mask)
    out, lse = backend.attention_forward(q, k, v, params)
    ref_out, ref_lse = reference.attention_reference(q, k, v, params)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)  # -inf where the reference has -inf
    if _has_dead_rows(case, mask) or case == "packed_unequal":
        assert torch.isinf(ref_lse).any()  # the case does contain rows that see no key
    # the backward of the given (out, lse), and of a perturbed pair as a ring merge passes it
    finite = torch.isfinite(ref_lse)
    shifted = torch.where(finite, ref_lse + 0.3 * randn(*ref_lse.shape, seed=5), ref_lse)
    for given_out, given_lse in ((ref_out, ref_lse), (0.8 * ref_out + 0.1, shifted)):
        grads = backend.attention_backward(dout, q, k, v, given_out, given_lse, params)
        expected = reference.attention_backward_reference(dout, q, k, v, given_out, given_lse,
                                                          params)
        for got, want, like in zip(grads, expected, (q, k, v)):
            assert got.shape == like.shape
            torch.testing.assert_close(got, want, **TOL)
    # autograd through Backend.attention
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    backend.attention(*leaves, params).backward(dout)
    reference.attention_reference(*ref_leaves, params)[0].backward(dout)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, **TOL)


def test_bottom_right_is_causal_when_lengths_are_equal():
    q, k, v, _, params = _case("packed_gqa", "causal")
    a = CPUBackend().attention_forward(q, k, v, params)
    b = CPUBackend().attention_forward(q, k, v, params.with_mask("causal_bottom_right"))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_reference_bottom_right_mask_is_the_documented_region():
    keep = reference.keep_mask(2, 5, "causal_bottom_right")
    assert keep.tolist() == [[True, True, True, True, False], [True] * 5]
    keep = reference.keep_mask(4, 2, "causal_bottom_right")
    assert keep.tolist() == [[False, False], [False, False], [True, False], [True, True]]
    assert reference.keep_mask(3, 4, "causal").tolist() == [
        [True, False, False, False], [True, True, False, False], [True, True, True, False]]
    assert reference.keep_mask(3, 4, "none") is None


# ---------------------------------------------------------------------------- host syncs
_BACKENDS_DIR = os.path.dirname(os.path.abspath(cuda_module.__file__))
_FAKES_DIR = os.path.join(_BACKENDS_DIR, "fakes")
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class SyncCounter:
    """Counts syncs / host-built tensors whose nearest non-torch caller is backend code
    (not the fakes, which stand for kernels, and not the test)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
            self._wrap(monkeypatch, torch.Tensor, name)
        self._wrap(monkeypatch, torch, "tensor")

    def _wrap(self, monkeypatch, owner, name):
        original = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
                frame = frame.f_back
            if frame is not None:
                path = os.path.abspath(frame.f_code.co_filename)
                if path.startswith(_BACKENDS_DIR) and not path.startswith(_FAKES_DIR):
                    counter.calls.append(f"{name} from {os.path.basename(path)}:{frame.f_lineno}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def _run_attention(backend, q, k, v, dout, params):
    out, lse = backend.attention_forward(q, k, v, params)
    backend.attention_backward(dout, q, k, v, out, lse, params)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    backend.attention(*leaves, params).backward(dout)


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("case", ["dense_gqa", "dense_q_shorter", "packed_gqa", "packed_unequal"])
@pytest.mark.parametrize("backend_name", ["cpu", "npu_fake"])
def test_attention_makes_no_host_sync_when_host_fields_are_given(monkeypatch, backend_name,
                                                                 case, mask):
    backend = BACKENDS[backend_name](monkeypatch)
    q, k, v, dout, params = _case(case, mask)  # built before counting: once per batch
    counter = SyncCounter(monkeypatch)
    _run_attention(backend, q, k, v, dout, params)
    assert counter.calls == []


@pytest.mark.parametrize("backend_name", ["cpu", "npu_fake"])
def test_the_sync_counter_sees_syncs(monkeypatch, backend_name):
    """Control: params with device tensors only make the backend read them to the host."""
    backend = BACKENDS[backend_name](monkeypatch)
    q, k, v, dout, params = _case("packed_gqa", "causal")
    tensor_only = AttentionParams(mask="causal", cu_seqlens_q=params.cu_seqlens_q)
    counter = SyncCounter(monkeypatch)
    _run_attention(backend, q, k, v, dout, tensor_only)
    assert any(call.startswith("tolist") for call in counter.calls)


def test_npu_lse_of_fully_masked_rows_is_minus_inf_not_the_kernel_value():
    q, k, v, _, params = _case("dense_q_longer", "causal_bottom_right")
    _, lse = NPUBackend(torch_npu_module=FakeTorchNPU()).attention_forward(q, k, v, params)
    assert torch.all(lse[:, :, :8] == -math.inf) and torch.isfinite(lse[:, :, 8:]).all()
