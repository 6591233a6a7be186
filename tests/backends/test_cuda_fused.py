"""backends/cuda_fused.py: the CUDA backend's fused RMSNorm / RoPE / SwiGLU.

CPU (CI): the functions every CUDA tensor meets on the eager side (torch's rms_norm, the eager
twins of the compiled kernels) equal the reference ops bit for bit, forward and backward, and
keep less for backward; the compile-or-eager switch. `gpu`: the compiled kernels and torch's
fused CUDA rms_norm against the reference on a GPU (bf16 within rounding), and what they keep.
"""
import warnings

import pytest
import torch

from backends import cuda_fused, reference
from tests.backends.attention_checks import randn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _saved(fn, *args):
    """(fn(*args), [(shape, dtype) of every tensor autograd saved])."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        out = fn(*args)
    return out, saved


def _forward_backward(fn, inputs, grad_seed):
    """fn's output and the gradients of every floating input (leaves cloned here)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(randn(*out.shape, seed=grad_seed, dtype=out.dtype).to(out.device))
    return out.detach(), [t.grad for t in leaves]


def _assert_same(fn, ref_fn, inputs, exact=True, tol=None):
    out, grads = _forward_backward(fn, inputs, grad_seed=9)
    ref, ref_grads = _forward_backward(ref_fn, [t.cpu() for t in inputs], grad_seed=9)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    for got, expected in [(out, ref)] + list(zip(grads, ref_grads)):
        if exact:
            assert torch.equal(got.cpu(), expected)
        else:
            torch.testing.assert_close(got.float().cpu(), expected.float(), **tol)


def _rms_inputs(dtype, weight_dtype=None, device="cpu"):
    x = randn(3, 7, 96, seed=0, dtype=dtype) * 3
    w = (1 + 0.1 * randn(96, seed=1)).to(weight_dtype or dtype)
    return [x.to(device), w.to(device)]


def _rope_inputs(dtype, trig_dtype=None, device="cpu"):
    x = randn(6, 2, 4, 64, seed=2, dtype=dtype).transpose(0, 1)  # [b, s, n, d] view of sbhd
    angles = randn(2, 6, 1, 64, seed=3)
    trig = trig_dtype or dtype
    return [x.to(device), angles.cos().to(trig).to(device), angles.sin().to(trig).to(device)]


def _swiglu_inputs(dtype, device="cpu"):
    return [randn(4, 6, 128, seed=4, dtype=dtype).transpose(0, 1).to(device)]


# ========================================================================= CPU: exact twins
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_is_the_reference_bit_for_bit(dtype):
    _assert_same(lambda x, w: cuda_fused.rms_norm(x, w, 1e-6),
                 lambda x, w: reference.rms_norm_reference(x, w, 1e-6), _rms_inputs(dtype))
    # fp32 weight on bf16 activations (promotion as in the reference)
    _assert_same(lambda x, w: cuda_fused.rms_norm(x, w, 1e-6),
                 lambda x, w: reference.rms_norm_reference(x, w, 1e-6),
                 _rms_inputs(dtype, weight_dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trig_grad", [False, True], ids=["x-grad", "x-and-cos-sin-grads"])
def test_rotary_eager_twin_is_the_reference_bit_for_bit(dtype, trig_grad):
    for trig_dtype in (dtype, torch.float32):  # fp32 cos/sin promote as in the reference
        inputs = _rope_inputs(dtype, trig_dtype)
        if not trig_grad:  # cos/sin as constants (the model's case): only x gets a gradient
            x, cos, sin = inputs
            _assert_same(lambda a: cuda_fused.rotary_eager(a, cos, sin),
                         lambda a: reference.rotary_reference(a, cos, sin), [x])
        else:
            _assert_same(cuda_fused.rotary_eager, reference.rotary_reference, inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_eager_twin_is_the_reference_bit_for_bit(dtype):
    _assert_same(cuda_fused.swiglu_eager, reference.swiglu_reference, _swiglu_inputs(dtype))


def test_eager_twins_keep_less_for_backward():
    x, cos, sin = _rope_inputs(torch.bfloat16)
    x.requires_grad_(True)
    _, saved = _saved(cuda_fused.rotary_eager, x, cos, sin)
    assert saved == [(tuple(cos.shape), cos.dtype), (tuple(sin.shape), sin.dtype)]  # not x
    (x,) = _swiglu_inputs(torch.bfloat16)
    x.requires_grad_(True)
    _, saved = _saved(cuda_fused.swiglu_eager, x)
    _, ref_saved = _saved(reference.swiglu_reference, x)
    assert saved == [(tuple(x.shape), x.dtype)]
    assert len(ref_saved) > 1  # the reference keeps gate/up views and silu(gate) too


def test_cuda_fused_layers_route_cpu_tensors_to_the_eager_twins(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled for CPU"))
    layers = cuda_fused.CUDAFusedLayers()
    x, cos, sin = _rope_inputs(torch.bfloat16)
    assert torch.equal(layers.apply_rotary(x, cos, sin), reference.rotary_reference(x, cos, sin))
    (g,) = _swiglu_inputs(torch.bfloat16)
    assert torch.equal(layers.swiglu(g), reference.swiglu_reference(g))
    x, w = _rms_inputs(torch.bfloat16)
    assert torch.equal(layers.rms_norm(x, w, 1e-6), reference.rms_norm_reference(x, w, 1e-6))


def test_compile_failure_warns_once_and_uses_the_eager_twin(monkeypatch):
    calls = []

    def broken_compile(fn, **kwargs):
        calls.append(kwargs)

        def run(*args):
            raise RuntimeError("Cannot find a working triton installation\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    op = cuda_fused.CompiledOrEager("swiglu", reference.swiglu_reference,
                                    cuda_fused.swiglu_eager, compile_on="cpu")
    (x,) = _swiglu_inputs(torch.float32)
    with pytest.warns(UserWarning, match="torch.compile of swiglu failed.*working triton"):
        out = op(x)
    assert torch.equal(out, reference.swiglu_reference(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(op(x), out)  # eager from now on, without another warning
    assert calls == [{"fullgraph": True}]


def test_compile_or_eager_keeps_the_compiled_kernel_and_lets_bad_input_raise(monkeypatch):
    compiled_calls = []

    def fake_compile(fn, **kwargs):
        return lambda *args: compiled_calls.append(1) or fn(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    op = cuda_fused.CompiledOrEager("apply_rotary", reference.rotary_reference,
                                    cuda_fused.rotary_eager, compile_on="cpu")
    x, cos, sin = _rope_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="size of tensor"):  # a shape error is not a build
        op(x, cos[:, :3], sin)                                  # failure: it surfaces
    assert op._usable is None
    for _ in range(2):
        op(x, cos, sin)
    assert op._usable is True and len(compiled_calls) == 3


# ====================================================================== GPU: real kernels
def _need_gpu():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need an NVIDIA GPU (ci/run_gpu_tests.sh)")


GPU_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fused_layers_match_the_reference(dtype):
    _need_gpu()
    layers = cuda_fused.CUDAFusedLayers()
    tol = GPU_TOL[dtype]
    cases = [
        (lambda x, w: layers.rms_norm(x, w, 1e-6),
         lambda x, w: reference.rms_norm_reference(x, w, 1e-6), _rms_inputs(dtype, device="cuda")),
        (layers.apply_rotary, reference.rotary_reference, _rope_inputs(dtype, device="cuda")),
        (layers.swiglu, reference.swiglu_reference, _swiglu_inputs(dtype, device="cuda")),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn, ref_fn, inputs in cases:
            _assert_same(fn, ref_fn, inputs, exact=False, tol=tol)
    failed = [str(w.message) for w in caught if "torch.compile of" in str(w.message)]
    assert not failed, failed  # torch.compile must build on a GPU host (Triton ships with torch)
    assert layers._rotary._usable is True and layers._swiglu._usable is True


@pytest.mark.gpu
def test_gpu_rms_norm_keeps_no_fp32_copy_of_x():
    _need_gpu()
    x, w = _rms_inputs(torch.bfloat16, device="cuda")
    x.requires_grad_(True)
    _, saved = _saved(cuda_fused.rms_norm, x, w, 1e-6)
    assert (tuple(x.shape), torch.float32) not in saved, saved
