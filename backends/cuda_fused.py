"""Fused RMSNorm, RoPE and SwiGLU for the CUDA backend, with the reference's numerics.

The reference ops (`backends.reference`) are eager chains of small kernels, and autograd keeps
what each link needs: RMSNorm an fp32 copy of x, SwiGLU the gate, up and silu(gate). Here:

* `rms_norm`: `torch.nn.functional.rms_norm` (statistics in fp32, the normalised value rounded to
  x's dtype; on CUDA one fused kernel whose backward keeps only x and the fp32 rstd), then the
  reference's `weight *` on that rounded value - Qwen2's order, so results equal the reference.
* `apply_rotary` / `swiglu`: on CUDA tensors, `torch.compile` of the reference expressions (one
  generated kernel forward, one backward; inductor keeps intermediates in fp32, so bf16 results
  differ from eager by rounding only). Their eager twins, `RotaryFunction` / `SwiGLUFunction`,
  compute exactly the reference's ops forward and backward (bitwise equal results) while
  keeping less for backward (cos/sin only; x only); they run on CPU tensors (the tests) and where
  torch.compile cannot build (no Triton / compiler on the host: one warning).

Every function takes tensors on any device; nothing here syncs with the host.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from backends import reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2 RMSNorm (see `reference.rms_norm_reference`) through torch's fused rms_norm."""
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


def _rotate_half_transposed(y: torch.Tensor) -> torch.Tensor:
    """The adjoint of `rotate_half`: cat(y2, -y1) (rotate_half(x) = cat(-x2, x1))."""
    y1, y2 = y.chunk(2, dim=-1)
    return torch.cat((y2, -y1), dim=-1)


class RotaryFunction(torch.autograd.Function):
    """`x * cos + rotate_half(x) * sin` keeping only cos/sin for backward (x too when cos/sin
    need gradients). Each gradient term is rounded to x's dtype before the two are added, as
    autograd does through the reference expression, so gradients are bitwise the reference's."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.trig_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(cos, sin, x if ctx.trig_grads else None)
        return reference.rotary_reference(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin, x = ctx.saved_tensors
        dx = dcos = dsin = None
        if ctx.needs_input_grad[0]:
            # as the autograd engine does per path: reduce to x's shape, then cast to its dtype
            direct = (grad * cos).sum_to_size(ctx.x_shape).to(ctx.x_dtype)
            rotated = (grad * sin).sum_to_size(ctx.x_shape).to(ctx.x_dtype)
            dx = direct + _rotate_half_transposed(rotated)
        if ctx.trig_grads:
            dcos = (grad * x).sum_to_size(cos.shape).to(cos.dtype)
            dsin = (grad * reference.rotate_half(x)).sum_to_size(sin.shape).to(sin.dtype)
        return dx, dcos, dsin


class SwiGLUFunction(torch.autograd.Function):
    """`silu(gate) * up` keeping only x for backward (gate, up and silu(gate) are recomputed;
    the reference keeps x and silu(gate), 1.5x as much), with the reference's backward ops."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return reference.swiglu_reference(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        d_up = grad * F.silu(gate)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return torch.cat((d_gate, d_up), dim=-1)


def rotary_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE through `RotaryFunction` (the eager twin of the compiled kernel)."""
    return RotaryFunction.apply(x, cos, sin)


def swiglu_eager(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU through `SwiGLUFunction` (the eager twin of the compiled kernel)."""
    return SwiGLUFunction.apply(x)


class CompiledOrEager:
    """`torch.compile(reference_fn)` on CUDA tensors, `eager_fn` on others. The first CUDA call
    builds the kernel; if that fails (no Triton or C compiler on the host), one warning names
    the reason and the eager twin is used from then on."""

    def __init__(self, name: str, reference_fn: Callable, eager_fn: Callable,
                 compile_on: str = "cuda") -> None:
        self.name = name
        self.compile_on = compile_on  # the device type whose tensors take the compiled path
        self._reference_fn = reference_fn
        self._eager_fn = eager_fn
        self._compiled: Optional[Callable] = None
        self._usable: Optional[bool] = None  # None until the first CUDA call

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if args[0].device.type != self.compile_on or self._usable is False:
            return self._eager_fn(*args)
        if self._usable:
            return self._compiled(*args)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self._reference_fn, fullgraph=True)
            out = self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - told apart below
            out = self._eager_fn(*args)  # bad input raises here as it would without compile
            self._usable = False
            text = str(exc).strip()
            first = text.splitlines()[0][:200] if text else ""
            warnings.warn(f"cuda backend: torch.compile of {self.name} failed "
                          f"({type(exc).__name__}: {first}); using its eager twin", stacklevel=2)
            return out
        self._usable = True
        return out


class CUDAFusedLayers:
    """`Backend.rms_norm / apply_rotary / swiglu` through the fused implementations above.
    Listed before `Backend` in a backend's bases so it provides them. The compiled kernels are
    shared by every instance (torch.compile caches per function anyway)."""

    _rotary = CompiledOrEager("apply_rotary", reference.rotary_reference, rotary_eager)
    _swiglu = CompiledOrEager("swiglu", reference.swiglu_reference, swiglu_eager)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._rotary(x, cos, sin)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self._swiglu(x)
