"""NPUBackend (driving the CPU fake of torch_npu) against CPUBackend and the reference kernels.

The fake (backends/fakes/torch_npu_fake.py) has the real ops' contracts, so these tests check
the backend's use of them: layouts, masks, sparse modes, cumulative lengths, statistics layouts,
and the lse <-> (softmax_max, softmax_sum) conversion that ring attention relies on.
Tolerances: fp32 atol 1e-5; bf16 atol/rtol 2e-2 (both sides round to bf16 at different points).
"""
import dataclasses
import importlib
import math
import subprocess
import sys
import types

import pytest
import torch

from tests.backends.attention_checks import (
    assert_autograd_matches_reference,
    cu_seqlens,
    randn,
)
from backends import get_backend
from backends.attention_params import AttentionParams
from backends.base import BackendUnavailableError
from backends.cpu import CPUBackend
from backends.fakes import FakeTorchNPU
import backends.npu as npu_module
from backends.fakes.torch_npu_fake import FLT_MAX
from backends.npu import NPUBackend

FP32_TOL = dict(atol=1e-5, rtol=0)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


class RecordingTorchNPU(FakeTorchNPU):
    """The fake, recording the keyword arguments of every attention call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.forward_calls, self.grad_calls = [], []

    def npu_fusion_attention(self, *args, **kwargs):
        self.forward_calls.append(kwargs)
        return super().npu_fusion_attention(*args, **kwargs)

    def npu_fusion_attention_grad(self, *args, **kwargs):
        self.grad_calls.append(kwargs)
        return super().npu_fusion_attention_grad(*args, **kwargs)


@pytest.fixture()
def npu_backend():
    return NPUBackend(torch_npu_module=RecordingTorchNPU())


# case id -> (q shape, kv shape, causal, packed lengths or None)
CASES = {
    "dense_causal": ((2, 24, 2, 16), (2, 24, 2, 16), True, None),
    "dense_full": ((2, 24, 2, 32), (2, 24, 2, 32), False, None),
    "dense_full_q_shorter": ((1, 12, 2, 16), (1, 40, 2, 16), False, None),
    "gqa_causal": ((2, 20, 4, 16), (2, 20, 2, 16), True, None),
    "packed_causal_gqa": ((39, 4, 16), (39, 2, 16), True, [5, 17, 1, 16]),
    "packed_full": ((30, 2, 32), (30, 2, 32), False, [7, 3, 20]),
}


def _case_tensors(case, dtype):
    q_shape, kv_shape, causal, lengths = CASES[case]
    q = randn(*q_shape, seed=1, dtype=dtype)
    k, v = randn(*kv_shape, seed=2, dtype=dtype), randn(*kv_shape, seed=3, dtype=dtype)
    dout = randn(*q_shape, seed=4, dtype=dtype)
    mask = "causal" if causal else "none"
    params = (AttentionParams.dense(mask) if lengths is None
              else AttentionParams.packed(cu_seqlens(lengths), mask=mask))
    return q, k, v, dout, params


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_forward_and_backward_match_cpu_backend(npu_backend, case, dtype, tol):
    q, k, v, dout, params = _case_tensors(case, dtype)
    cpu = CPUBackend()
    out, lse = npu_backend.attention_forward(q, k, v, params)
    ref_out, ref_lse = cpu.attention_forward(q, k, v, params)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)

    # the backward must use the GIVEN out/lse, so also feed a perturbed pair, as a ring merge does
    shift = 0.3 * randn(*lse.shape, seed=5)
    merged_out = (0.8 * ref_out.float() + 0.1 * randn(*ref_out.shape, seed=6)).to(dtype)
    for given_out, given_lse in ((ref_out, ref_lse), (merged_out, ref_lse + shift)):
        grads = npu_backend.attention_backward(dout, q, k, v, given_out, given_lse, params)
        ref_grads = cpu.attention_backward(dout, q, k, v, given_out, given_lse, params)
        for got, expected, like in zip(grads, ref_grads, (q, k, v)):
            assert got.shape == like.shape and got.dtype == like.dtype
            torch.testing.assert_close(got.float(), expected.float(), **tol)


@pytest.mark.parametrize("case", ["gqa_causal", "packed_causal_gqa", "packed_full"])
def test_attention_autograd_matches_reference_autograd(npu_backend, case):
    q, k, v, dout, params = _case_tensors(case, torch.float32)
    assert_autograd_matches_reference(npu_backend, q, k, v, dout, params, FP32_TOL)


def test_attention_calls_the_op_as_the_fact_sheet_requires(npu_backend):
    fake = npu_backend._ops
    q, k, v, dout, params = _case_tensors("dense_causal", torch.float32)
    out, lse = npu_backend.attention_forward(q, k, v, params)
    npu_backend.attention_backward(dout, q, k, v, out, lse, params)
    npu_backend.attention_forward(q, k, v, params)
    dense_fwd, dense_grad, dense_again = fake.forward_calls[0], fake.grad_calls[0], fake.forward_calls[1]
    assert dense_fwd["input_layout"] == "BSND" and dense_fwd["head_num"] == 2
    assert dense_fwd["sparse_mode"] == 2 and dense_fwd["scale"] == pytest.approx(1 / math.sqrt(16))
    assert dense_grad["scale_value"] == pytest.approx(1 / math.sqrt(16)) and dense_grad["sparse_mode"] == 2
    assert dense_fwd["atten_mask"].shape == (2048, 2048)
    assert dense_again["atten_mask"] is dense_fwd["atten_mask"] is dense_grad["atten_mask"]  # built once

    q, k, v, dout, params = _case_tensors("packed_causal_gqa", torch.float32)
    npu_backend.attention_forward(q, k, v, dataclasses.replace(params, scale=0.5))
    packed = fake.forward_calls[-1]
    # "causal" is top-left: sparse_mode 2 (mode 3 is bottom-right and refuses s_q > s_kv in TND)
    assert packed["input_layout"] == "TND" and packed["sparse_mode"] == 2 and packed["scale"] == 0.5
    assert packed["actual_seq_qlen"] == [5, 22, 23, 39] and all(type(x) is int for x in packed["actual_seq_qlen"])
    assert packed["atten_mask"] is dense_fwd["atten_mask"]

    q, k, v, dout, params = _case_tensors("dense_full", torch.float32)
    npu_backend.attention_forward(q, k, v, params)
    assert fake.forward_calls[-1]["atten_mask"] is None and fake.forward_calls[-1]["sparse_mode"] == 0


def test_packed_rows_must_match_the_cumulative_lengths(npu_backend):
    """The kernel takes T > the sum of lengths and leaves the tail uninitialised: refused here."""
    q = randn(10, 2, 16, seed=0)
    with pytest.raises(ValueError, match="10 rows but its cumulative lengths end at 9"):
        npu_backend.attention_forward(q, q, q, AttentionParams.packed([0, 4, 9], mask="causal"))
    with pytest.raises(ValueError, match="start at 0"):
        npu_backend.attention_forward(q, q, q, AttentionParams.packed([4, 10], mask="none"))


def test_backward_works_with_a_torch_npu_that_returns_dsink(npu_backend):
    backend = NPUBackend(torch_npu_module=FakeTorchNPU(release="7.3.0"))
    q, k, v, dout, params = _case_tensors("gqa_causal", torch.float32)
    out, lse = backend.attention_forward(q, k, v, params)
    grads = backend.attention_backward(dout, q, k, v, out, lse, params)
    ref = CPUBackend().attention_backward(dout, q, k, v, out, lse, params)
    for got, expected in zip(grads, ref):
        torch.testing.assert_close(got, expected, **FP32_TOL)


# ----------------------------------------------------------------------------- fused layers
@pytest.mark.parametrize("x_dtype,w_dtype,tol", [
    (torch.float32, torch.float32, FP32_TOL),
    (torch.bfloat16, torch.bfloat16, BF16_TOL),
    (torch.bfloat16, torch.float32, BF16_TOL),
])
def test_rms_norm_matches_cpu_forward_and_backward(npu_backend, x_dtype, w_dtype, tol):
    x = randn(3, 5, 64, seed=0, dtype=x_dtype)
    w = (1 + 0.1 * randn(64, seed=1)).to(w_dtype)
    x1, w1, x2, w2 = (t.clone().requires_grad_(True) for t in (x, w, x, w))
    out, ref = npu_backend.rms_norm(x1, w1, 1e-6), CPUBackend().rms_norm(x2, w2, 1e-6)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    dy = randn(*ref.shape, seed=2, dtype=ref.dtype)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), **tol)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=tol["atol"] * 10, rtol=tol["rtol"])


@pytest.mark.parametrize("x_shape,cos_shape", [
    ((6, 2, 3, 16), (6, 1, 1, 16)),   # [s, b, n, d] with megatron's [s, 1, 1, d]
    ((2, 6, 3, 16), (1, 6, 1, 16)),   # [b, s, n, d] with [1, s, 1, d]
    ((2, 6, 3, 16), (2, 6, 1, 16)),   # per-sample positions [b, s, 1, d]
    ((2, 6, 3, 16), (6, 3, 16)),      # [s, n, d]: not a kernel pattern, expanded
    ((2, 6, 3, 16), (16,)),           # one position for everything
    ((9, 3, 16), (9, 1, 16)),         # packed [t, n, d]
    ((9, 16), (9, 16)),               # [t, d]
])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
def test_apply_rotary_matches_cpu_forward_and_backward(npu_backend, x_shape, cos_shape, dtype, tol):
    x = randn(*x_shape, seed=0, dtype=dtype)
    angles = randn(*cos_shape, seed=1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = npu_backend.apply_rotary(x1, cos, sin), CPUBackend().apply_rotary(x2, cos, sin)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    dy = randn(*ref.shape, seed=2, dtype=dtype)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
def test_swiglu_matches_cpu_forward_and_backward(npu_backend, dtype, tol):
    x = randn(4, 6, 32, seed=0, dtype=dtype).transpose(0, 1)  # non-contiguous input
    x1, x2 = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    assert not x1.is_contiguous()
    out, ref = npu_backend.swiglu(x1), CPUBackend().swiglu(x2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    dy = randn(*ref.shape, seed=1, dtype=dtype)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), **tol)


# ---------------------------------------------------------------------------------- runtime
def test_runtime_goes_through_torch_npu_npu():
    fake = FakeTorchNPU(device_count=2)
    backend = NPUBackend(torch_npu_module=fake)
    assert (backend.name, backend.dist_backend) == ("npu", "hccl")
    backend.set_device(1)
    assert fake.npu.current_device() == 1
    backend.seed(11)
    assert torch.initial_seed() == 11 and fake.npu.seed_calls == [("manual_seed_all", 11)]
    backend.synchronize()
    assert fake.npu.synchronize_calls == 1
    backend.reset_peak_memory_stats()
    assert fake.npu.reset_calls == 1 and backend.max_memory_allocated() > 0


def test_device_is_the_current_npu():
    """`device()` is the NPU `set_device` bound (LOCAL_RANK), so rank r of a node uses NPU r;
    `device(i)` names NPU i explicitly."""
    # torch.device("npu") exists only once torch_npu renames the PrivateUse1 backend; do the same
    # in a child process so this test process keeps a plain torch.
    code = ("import torch; torch.utils.rename_privateuse1_backend('npu');"
            "from backends.npu import NPUBackend; from backends.fakes import FakeTorchNPU;"
            "b = NPUBackend(torch_npu_module=FakeTorchNPU(device_count=4));"
            "print(b.device(), b.describe()['device'], b.device(2));"
            "b.set_device(1); print(b.device(), b.describe()['device'], b.device(2))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.split("\n")[:2] == ["npu:0 npu:0 npu:2", "npu:1 npu:1 npu:2"]


def test_importing_backends_npu_does_not_import_torch_npu():
    result = subprocess.run([sys.executable, "-c", "import sys, backends.npu; print('torch_npu' in sys.modules)"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def _assert_one_sentence(message):
    assert "\n" not in message and ". " not in message and message.count("backend 'npu' cannot run") == 1


def test_probe_without_torch_npu_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails like a missing package
    message = NPUBackend.probe()
    _assert_one_sentence(message)
    version = torch.__version__.split("+")[0]
    assert "torch_npu failed to import" in message
    # both CANN layouts (8.x ascend-toolkit, 9.x cann) where none is installed here
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in message
    assert "source /usr/local/Ascend/cann/set_env.sh" in message
    # a wildcard, so the X.Y.Z.postN builds (each paired with a CANN release) match
    assert f"pip install torch-npu=={version}.*'" in message
    with pytest.raises(BackendUnavailableError) as raised:
        NPUBackend()
    assert str(raised.value) == message
    with pytest.raises(BackendUnavailableError, match="torch_npu failed to import"):
        get_backend("npu")


class _CannMissingFinder:
    """Makes `import torch_npu` fail the way it does without CANN libraries."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch_npu":
            raise OSError("libhccl.so: cannot open shared object file: No such file or directory. Please check "
                          "that the cann package is installed.\n[ERROR] ERR00008 PTA resource not found")
        return None


def test_probe_with_torch_npu_but_without_cann(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_CannMissingFinder()] + sys.meta_path)
    message = NPUBackend.probe()
    _assert_one_sentence(message)
    assert "libhccl.so: cannot open shared object file: No such file or directory" in message
    assert "set_env.sh" in message


def test_probe_without_a_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", FakeTorchNPU(device_count=0))
    message = NPUBackend.probe()
    _assert_one_sentence(message)
    assert "no Ascend NPU is visible" in message and "npu-smi" in message
    monkeypatch.setitem(sys.modules, "torch_npu", FakeTorchNPU(device_count=1))
    assert NPUBackend.probe() is None


# ---------------------------------------------------------------------------------- engines
def test_adapt_megatron_without_mindspeed_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "mindspeed", None)  # importing it would fail
    NPUBackend(torch_npu_module=FakeTorchNPU()).adapt_megatron()


def test_adapt_megatron_with_mindspeed_missing_names_the_install_guide(monkeypatch):
    monkeypatch.setattr(npu_module, "_megatron_core_version", lambda: "0.12.1")
    monkeypatch.setitem(sys.modules, "mindspeed", None)
    backend = NPUBackend(torch_npu_module=FakeTorchNPU(), use_mindspeed=True)
    with pytest.raises(BackendUnavailableError, match="install_guide.md"):
        backend.adapt_megatron()


def test_adapt_megatron_imports_the_adaptor_once(monkeypatch, tmp_path):
    monkeypatch.setattr(npu_module, "_megatron_core_version", lambda: "0.12.1")
    package = tmp_path / "mindspeed"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "megatron_adaptor.py").write_text("import builtins\nbuiltins.MINDSPEED_ADAPTED = "
                                                 "getattr(builtins, 'MINDSPEED_ADAPTED', 0) + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mindspeed", "mindspeed.megatron_adaptor"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "megatron", types.ModuleType("megatron"))  # imported too early
    importlib.invalidate_caches()
    import builtins
    backend = NPUBackend(torch_npu_module=FakeTorchNPU(), use_mindspeed=True)
    try:
        with pytest.warns(UserWarning, match="after megatron was imported"):
            backend.adapt_megatron()
        backend.adapt_megatron()
        assert builtins.MINDSPEED_ADAPTED == 1
    finally:
        for name in ("mindspeed", "mindspeed.megatron_adaptor"):
            sys.modules.pop(name, None)
        del builtins.MINDSPEED_ADAPTED


# ------------------------------------------------------------ issue 8 section 3: the real ops
def _mindspeed_package(tmp_path, monkeypatch, body):
    package = tmp_path / "mindspeed"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "megatron_adaptor.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mindspeed", "mindspeed.megatron_adaptor"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()


def test_mindspeed_with_another_megatron_core_is_one_sentence_naming_both(monkeypatch, tmp_path):
    _mindspeed_package(tmp_path, monkeypatch, "raise AssertionError('must not be imported')\n")
    monkeypatch.setattr(npu_module, "_megatron_core_version", lambda: "0.16.1")
    backend = NPUBackend(torch_npu_module=FakeTorchNPU(), use_mindspeed=True)
    with pytest.raises(BackendUnavailableError) as raised:
        backend.adapt_megatron()
    message = str(raised.value)
    assert "\n" not in message and ". " not in message
    assert "megatron-core 0.12.1" in message and "megatron-core 0.16.1" in message


def test_mindspeed_patch_failure_is_not_a_runtime_error_traceback(monkeypatch, tmp_path):
    """MindSpeed raises RuntimeError('no exist ...') when a patch target is missing (a version
    that could not be read beforehand): the user gets the same one sentence."""
    _mindspeed_package(tmp_path, monkeypatch,
                       "raise RuntimeError('no exist megatron.core.foo.bar of patch')\n")
    monkeypatch.setattr(npu_module, "_megatron_core_version", lambda: None)
    backend = NPUBackend(torch_npu_module=FakeTorchNPU(), use_mindspeed=True)
    with pytest.raises(BackendUnavailableError, match="pairs only with megatron-core 0.12.1") as raised:
        backend.adapt_megatron()
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_megatron_core_version_is_read_without_importing_it(monkeypatch, tmp_path):
    core = tmp_path / "megatron" / "core"
    core.mkdir(parents=True)
    (tmp_path / "megatron" / "__init__.py").write_text("raise AssertionError('imported')\n")
    (core / "package_info.py").write_text("MAJOR = 0\nMINOR = 12\nPATCH = 1\nPRE_RELEASE = ''\n")
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert npu_module._megatron_core_version() == "0.12.1"
    assert "megatron" not in sys.modules


class _RankRecordingNPU(FakeTorchNPU):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rotary_shapes = []

    def npu_rotary_mul(self, x, r1, r2, *args, **kwargs):
        self.rotary_shapes.append((tuple(x.shape), tuple(r1.shape)))
        return super().npu_rotary_mul(x, r1, r2, *args, **kwargs)


def test_rotary_sends_4d_input_on_releases_before_7_3_0():
    fake = _RankRecordingNPU(release="7.2.0")
    backend = NPUBackend(torch_npu_module=fake)
    x, angles = randn(9, 3, 16, seed=0), randn(9, 1, 16, seed=1)
    out = backend.apply_rotary(x, angles.cos(), angles.sin())
    torch.testing.assert_close(out, CPUBackend().apply_rotary(x, angles.cos(), angles.sin()), **FP32_TOL)
    # packed [t, n, d] as SBND [t, 1, n, d] with the S11D broadcast [t, 1, 1, d]
    assert fake.rotary_shapes == [((9, 1, 3, 16), (9, 1, 1, 16))]


def test_rotary_with_wider_cos_sin_keeps_the_reference_numerics(npu_backend):
    """The kernel casts cos/sin to x's dtype; the protocol (reference) promotes instead."""
    x = randn(9, 3, 64, seed=0, dtype=torch.bfloat16)
    angles = 50.0 * randn(9, 1, 64, seed=1)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = npu_backend.apply_rotary(x1, cos, sin), CPUBackend().apply_rotary(x2, cos, sin)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    # bf16 x.grad: the reference rounds each of its two terms to bf16 before adding them
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), **BF16_TOL)


@pytest.mark.parametrize("mask,packed,lengths_kv,mode,band", [
    ("none", False, None, 0, None),
    ("causal", False, None, 2, None),                 # top-left
    ("causal_bottom_right", False, None, 3, None),
    ("none", True, None, 0, None),
    ("causal", True, [7, 2, 9], 2, None),             # top-left per sequence, any lengths
    ("causal_bottom_right", True, [7, 5, 9], 3, None),  # every s_q <= s_kv
    ("causal_bottom_right", True, [7, 2, 9], 4, (9, 0)),  # s_q 5 > s_kv 2: mode 3 refuses
])
def test_mask_kinds_map_to_the_documented_sparse_modes(npu_backend, mask, packed, lengths_kv, mode, band):
    fake = npu_backend._ops
    if packed:
        q = randn(14, 2, 16, seed=0)
        kv_lengths = lengths_kv or [4, 5, 5]
        k = randn(sum(kv_lengths), 2, 16, seed=1)
        params = AttentionParams.packed(cu_seqlens([4, 5, 5]), cu_seqlens(kv_lengths), mask=mask)
    else:
        q, k = randn(2, 5, 2, 16, seed=0), randn(2, 8, 2, 16, seed=1)
        params = AttentionParams.dense(mask)
    out, lse = npu_backend.attention_forward(q, k, k, params)
    npu_backend.attention_backward(out, q, k, k, out, lse, params)
    for call in (fake.forward_calls[-1], fake.grad_calls[-1]):
        assert call["sparse_mode"] == mode
        assert (call["atten_mask"] is None) == (mode == 0)
        if band is not None:
            assert (call["pre_tockens"], call["next_tockens"]) == band
    ref_out, ref_lse = CPUBackend().attention_forward(q, k, k, params)
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_fully_masked_rows_map_the_kernels_lse_to_minus_inf_and_back(npu_backend, packed):
    fake = npu_backend._ops
    if packed:  # sequence 1 has 6 queries for 2 keys: its first 4 rows see no key
        q, k = randn(9, 2, 16, seed=0), randn(5, 1, 16, seed=1)
        params = AttentionParams.packed(cu_seqlens([3, 6]), cu_seqlens([3, 2]),
                                        mask="causal_bottom_right")
        dead = [3, 4, 5, 6]
    else:
        q, k = randn(1, 6, 2, 16, seed=0), randn(1, 2, 1, 16, seed=1)
        params = AttentionParams.dense("causal_bottom_right")
        dead = [0, 1, 2, 3]
    out, lse = npu_backend.attention_forward(q, k, k, params)
    stats = fake.forward_calls[-1]
    dead_lse = lse[..., dead]
    assert torch.isneginf(dead_lse).all() and torch.isfinite(lse[..., [i for i in range(lse.shape[-1])
                                                                         if i not in dead]]).all()
    dout = torch.ones_like(out)
    grads = npu_backend.attention_backward(dout, q, k, k, out, lse, params)
    ref = CPUBackend().attention_backward(dout, q, k, k, out, lse, params)
    for got, expected in zip(grads, ref):
        torch.testing.assert_close(got, expected, **FP32_TOL)
    # the grad kernel gets the statistics the forward kernel wrote for those rows
    grad_call = fake.grad_calls[-1]
    smax, ssum = grad_call["softmax_max"], grad_call["softmax_sum"]
    assert (smax == -FLT_MAX).sum() == (ssum == FLT_MAX).sum() == len(dead) * q.shape[-2] * 8
    assert not torch.isinf(smax).any() and stats["sparse_mode"] in (3, 4)

