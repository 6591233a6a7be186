"""The FlashAttention-2 kernels the CUDA backend calls, behind one interface per package.

Both wrappers offer the same four calls, each taking q/k/v whose LAST dimension is contiguous
(any other strides are fine: the kernels read strides, so views are not copied):

* `dense_forward(q, k, v, causal, scale)`: `[b, s, n, d]` -> (out `[b, s_q, n, d]`,
  lse fp32 `[b, n, s_q]`); `dense_backward(dout, q, k, v, out, lse, causal, scale)`.
* `forward(q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale)`: varlen `[t, n, d]` with int32
  cumulative lengths -> (out, lse in the kernel's layout: `[n, t]`, or `[b, n, max_q]` padded
  from older PyTorch builds); `backward(...)` likewise.

Causal is bottom-right aligned (key j visible to query i iff j <= i + s_kv - s_q); rows without
keys get out 0 and lse +inf. Dropout is 0 and windows unlimited in every call.

* `TorchFlashKernels`: `torch.ops.aten._flash_attention_forward / _backward` (PyTorch 2.13
  schema); the backward reads torch's deterministic-algorithms flag itself.
* `FlashAttnKernels`: flash-attn's private `_flash_attn_[varlen_]forward / _backward`. Their
  signatures changed between releases (2.6: `window_size=(l, r)`, 8 return values; 2.7/2.8:
  `window_size_left/right`, custom ops with 4 return values), so they are bound by keyword after
  reading their signatures; one this file does not know is a `FlashAttnSignatureError` naming
  the parameter. `deterministic` is `torch.are_deterministic_algorithms_enabled()` per call.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Dict, Optional, Sequence

import torch


class TorchFlashKernels:
    """PyTorch's FlashAttention-2 ops:

    `_flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
    is_causal, return_debug_mask, *, scale, window_size_left, window_size_right, seqused_k,
    alibi_slopes, block_table, num_splits) -> (output, softmax_logsumexp, rng_state, unused,
    debug_attn_mask)` and `_flash_attention_backward(grad_out, query, key, value, out,
    logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state, unused, *,
    scale, window_size_left, window_size_right) -> (dq, dk, dv)`; `cum_seq_* = None` is the
    dense form (`max_q/max_k` are then the sequence lengths).
    """

    name = "torch"

    def __init__(self, aten) -> None:
        self._aten = aten
        #: True when the varlen lse is padded [b, n, max_q]; None until seen
        self.lse_padded: Optional[bool] = None

    def forward(self, q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """(out, lse in the kernel's layout); cu_q = cu_kv = None for dense input."""
        result = self._aten._flash_attention_forward(q, k, v, cu_q, cu_kv, max_q, max_kv, 0.0,
                                                     causal, False, scale=scale)
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """(dq, dk, dv) for the given out and lse (kernel layout)."""
        # With dropout_p = 0 the kernel never reads the philox state; these placeholders are
        # device-side fills (no host copy) with the forward's dtypes.
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = self._aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, 0.0, causal, rng_state, unused,
            scale=scale)
        return dq, dk, dv

    def dense_forward(self, q, k, v, causal, scale):
        """Dense [b, s, n, d]: (out, lse [b, n, s_q])."""
        return self.forward(q, k, v, None, None, q.shape[1], k.shape[1], causal, scale)

    def dense_backward(self, dout, q, k, v, out, lse, causal, scale):
        """Dense [b, s, n, d]: (dq, dk, dv) for the given out and lse [b, n, s_q]."""
        return self.backward(dout, q, k, v, out, lse, None, None, q.shape[1], k.shape[1],
                             causal, scale)


class FlashAttnSignatureError(RuntimeError):
    """The installed flash-attn's private functions have a signature we do not know."""


_VARLEN = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
_FWD_CORE = ("q", "k", "v", "dropout_p", "softmax_scale", "causal")
_BWD_CORE = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
             "softmax_scale", "causal", "deterministic")
#: the other parameters of flash-attn 2.6-2.8 we know, with the value that means "off"
_FWD_EXTRA = {"window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
              "softcap": 0.0, "alibi_slopes": None, "return_softmax": False, "block_table": None,
              "leftpad_k": None, "seqused_k": None, "zero_tensors": False}
_BWD_EXTRA = {"window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
              "softcap": 0.0, "alibi_slopes": None, "rng_state": None, "zero_tensors": False}


def _signature_parameters(fn) -> Dict[str, inspect.Parameter]:
    """Parameters of a flash-attn function; 2.7+ wraps them in torch.library.custom_op, whose
    CustomOpDef hides the signature behind (*args, **kwargs) and keeps the function in _init_fn."""
    target = getattr(fn, "_init_fn", None) or inspect.unwrap(fn)
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError) as exc:
        raise FlashAttnSignatureError(f"its signature cannot be read ({exc})") from exc


def _fixed_keywords(fn, qualname: str, core: Sequence[str], extra: Dict[str, object],
                    version: str) -> Dict[str, object]:
    """The keyword arguments beyond `core` to pass to `fn`, checked against its signature."""
    def drift(what: str) -> FlashAttnSignatureError:
        return FlashAttnSignatureError(
            f"flash-attn {version}: flash_attn_interface.{qualname} {what}; this backend binds "
            f"the 2.6-2.8 signatures")

    try:
        params = _signature_parameters(fn)
    except FlashAttnSignatureError as exc:
        raise drift(str(exc)) from exc
    named = {n: p for n, p in params.items()
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    missing = [n for n in core if n not in named]
    if missing:
        raise drift(f"has no parameter {', '.join(map(repr, missing))}")
    positional_only = [n for n, p in named.items() if p.kind == inspect.Parameter.POSITIONAL_ONLY]
    if positional_only:
        raise drift(f"takes {', '.join(map(repr, positional_only))} only by position")
    if "window_size" in named and ("window_size_left" in named or "window_size_right" in named):
        raise drift("has both 'window_size' and 'window_size_left/right'")
    fixed = {}
    for name, param in named.items():
        if name in core:
            continue
        if name in extra:
            fixed[name] = extra[name]
        elif param.default is inspect.Parameter.empty:
            raise drift(f"needs parameter {name!r} that this backend does not know")
    return fixed


class FlashAttnKernels:
    """flash-attn's private dense and varlen functions, bound by keyword to the installed
    version."""

    name = "flash_attn"

    def __init__(self, interface, version: str) -> None:
        self.version = version
        self._fns = {}
        self._fixed = {}
        for name, core, extra in (
                ("_flash_attn_varlen_forward", _FWD_CORE + _VARLEN, _FWD_EXTRA),
                ("_flash_attn_varlen_backward", _BWD_CORE + _VARLEN, _BWD_EXTRA),
                ("_flash_attn_forward", _FWD_CORE, _FWD_EXTRA),
                ("_flash_attn_backward", _BWD_CORE, _BWD_EXTRA)):
            self._fns[name] = getattr(interface, name)
            self._fixed[name] = _fixed_keywords(self._fns[name], name, core, extra, version)
        self.lse_padded: Optional[bool] = None

    @classmethod
    def load(cls) -> "FlashAttnKernels":
        """Import flash_attn (which loads its compiled kernels) and bind it; ImportError /
        OSError when the build does not load, FlashAttnSignatureError when it cannot bind."""
        package = importlib.import_module("flash_attn")
        interface = importlib.import_module("flash_attn.flash_attn_interface")
        version = str(getattr(package, "__version__", "unknown"))
        try:
            return cls(interface, version)
        except AttributeError as exc:  # a private function is gone
            raise FlashAttnSignatureError(
                f"flash-attn {version}: {exc}; this backend binds the 2.6-2.8 private "
                "functions") from exc

    def _call_forward(self, name, **kwargs):
        result = self._fns[name](dropout_p=0.0, **kwargs, **self._fixed[name])
        # 2.6: (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state);
        # 2.7+: (out_padded, softmax_lse, S_dmask, rng_state). head_dim % 8 == 0: no padding.
        if len(result) == 8:
            return result[0], result[5]
        if len(result) == 4:
            return result[0], result[1]
        raise FlashAttnSignatureError(
            f"flash-attn {self.version}: {name} returned {len(result)} values, expected 8 (2.6) "
            "or 4 (2.7+)")

    def _call_backward(self, name, q, k, v, **kwargs):
        """The functions write into the buffers they are given (every version)."""
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._fns[name](q=q, k=k, v=v, dq=dq, dk=dk, dv=dv, dropout_p=0.0,
                        deterministic=torch.are_deterministic_algorithms_enabled(), **kwargs,
                        **self._fixed[name])
        return dq, dk, dv

    def forward(self, q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """Varlen: (out [t, n, d], lse in the kernel's layout)."""
        return self._call_forward("_flash_attn_varlen_forward", q=q, k=k, v=v,
                                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_kv, max_seqlen_q=max_q,
                                  max_seqlen_k=max_kv, softmax_scale=scale, causal=causal)

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """Varlen: (dq, dk, dv) for the given out and lse."""
        return self._call_backward("_flash_attn_varlen_backward", q, k, v, dout=dout, out=out,
                                   softmax_lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_kv,
                                   max_seqlen_q=max_q, max_seqlen_k=max_kv, softmax_scale=scale,
                                   causal=causal)

    def dense_forward(self, q, k, v, causal, scale):
        """Dense [b, s, n, d]: (out, lse [b, n, s_q])."""
        return self._call_forward("_flash_attn_forward", q=q, k=k, v=v, softmax_scale=scale,
                                  causal=causal)

    def dense_backward(self, dout, q, k, v, out, lse, causal, scale):
        """Dense [b, s, n, d]: (dq, dk, dv) for the given out and lse [b, n, s_q]."""
        return self._call_backward("_flash_attn_backward", q, k, v, dout=dout, out=out,
                                   softmax_lse=lse, softmax_scale=scale, causal=causal)
