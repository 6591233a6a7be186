"""CPU fakes of the CUDA flash-attention kernels, to test backends/cuda.py on any machine.

Both fakes have the real contracts (checked by tests against the installed torch's schema and
against the flash-attn signatures) and FlashAttention-2's semantics, computed in fp32:

* varlen (THD) input with int32 cumulative lengths (leading 0); each sequence attends only to
  its own keys. `max_seqlen_*` must cover every sequence.
* causal is aligned **bottom-right** per sequence: key j is visible to query i iff
  `j <= i + s_kv - s_q` (flash-attn's documented convention, also PyTorch's copy).
* GQA by contiguous groups: query head h uses kv head `h // (n_q // n_kv)`; dk / dv are
  summed over each group.
* lse fp32, natural log of the scaled scores: `[n, total_q]`, or with `lse_layout="padded"`
  `[b, n, max_q]` as older PyTorch builds return it (padding rows are NaN, so a caller that
  reads them is caught). A row that sees no key gets output 0 and lse **+inf**.
* the backward uses the out and lse it is given (P = exp(S - lse), D = rowsum(dout * out)).
* dtypes float16 / bfloat16 (float32 too with `allow_fp32=True`, for exact wrapper tests),
  head_dim a multiple of 8 up to 256, last dim contiguous (any other strides are taken, as the
  real kernels take them), dropout 0, windows unlimited: a call outside these raises, as the
  real kernels would (or as this backend never should).
* the varlen forward's decode path (`max_seqlen_q == 1` with more query than kv heads: the
  kernels fold the query heads of a group into the sequence axis by reshaping q to
  `[batch, n_kv, group, d]`) fails as the real one does when a query segment is empty.
* dense form (`[b, s, n, d]`, no cumulative lengths): lse `[b, n, s_q]` in every version.

`FakeAtenFlash` stands for `torch.ops.aten` (`_flash_attention_forward` / `_backward` with
PyTorch 2.13's schema, dense and varlen). It records every call with `KernelCall` entries:
the storages q/k/v (and dout/out) came from, so tests can tell a view that reached the kernel
from a copy. `fake_flash_attn_modules(style)` builds a `flash_attn` package whose
`flash_attn_interface` has the private dense and varlen functions in one of the known styles:
"2.6" (`window_size=(l, r)`, 8 return values, plain functions) or "2.7" (2.7.x-2.8.x:
`window_size_left/right`, 4 return values, wrapped in `torch.library.custom_op` as the real
ones are), optionally with an extra parameter to emulate signature drift.
"""
import itertools
import math
import types
from typing import Dict, List, Optional, Tuple

import torch

_counter = itertools.count()


def _lengths(cu: torch.Tensor, name: str) -> List[int]:
    if cu.dtype != torch.int32 or cu.dim() != 1 or not cu.is_contiguous():
        raise RuntimeError(f"{name} must be a contiguous 1-D int32 tensor, got {cu.dtype} "
                           f"{tuple(cu.shape)}")
    values = [int(x) for x in cu.tolist()]
    if len(values) < 2 or values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise RuntimeError(f"{name} must start at 0 and be non-decreasing, got {values}")
    return [b - a for a, b in zip(values, values[1:])]


class _Call:
    """Checked geometry of one varlen call."""

    def __init__(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, allow_fp32):
        dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if allow_fp32 else ())
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 3:
                raise RuntimeError(f"varlen {name} must be [total, heads, head_dim], got "
                                   f"{tuple(t.shape)}")
            if t.dtype not in dtypes:
                raise RuntimeError(f"FlashAttention only supports fp16 and bf16, got {name} "
                                   f"{t.dtype}")
            if t.stride(-1) != 1:
                raise RuntimeError(f"{name} must have contiguous last dimension")
        if not q.dtype == k.dtype == v.dtype:
            raise RuntimeError("query, key and value must have the same dtype")
        d = q.shape[-1]
        if k.shape[-1] != d or v.shape[-1] != d or d % 8 or d > 256:
            raise RuntimeError(f"head_dim must match and be a multiple of 8 up to 256, got {d}")
        if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
            raise RuntimeError("Number of heads in key/value must divide number of heads in query")
        if dropout_p != 0.0:
            raise RuntimeError("the fake supports dropout_p == 0 only")
        self.lq, self.lk = _lengths(cu_q, "cu_seqlens_q"), _lengths(cu_k, "cu_seqlens_k")
        if len(self.lq) != len(self.lk):
            raise RuntimeError("cu_seqlens_q and cu_seqlens_k must have the same batch size")
        if sum(self.lq) != q.shape[0] or sum(self.lk) != k.shape[0]:
            raise RuntimeError("cu_seqlens do not end at the number of rows")
        if max(self.lq) > max_q or max(self.lk) > max_k:
            raise RuntimeError(f"max_seqlen ({max_q}, {max_k}) smaller than a sequence "
                               f"({max(self.lq)}, {max(self.lk)})")
        self.max_q, self.group = int(max_q), q.shape[1] // k.shape[1]
        self.starts_q = [sum(self.lq[:i]) for i in range(len(self.lq))]
        self.starts_k = [sum(self.lk[:i]) for i in range(len(self.lk))]

    def sequences(self):
        for b, (sq, sk, cq, ck) in enumerate(zip(self.lq, self.lk, self.starts_q, self.starts_k)):
            yield b, slice(cq, cq + sq), slice(ck, ck + sk)

    def scores(self, q, k, scale, causal):
        """fp32 [n, s_q, s_kv] with -inf outside the bottom-right causal mask."""
        kf = k.float().repeat_interleave(self.group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
        if causal:
            s_q, s_k = q.shape[0], k.shape[0]
            i = torch.arange(s_q)[:, None]
            j = torch.arange(s_k)[None, :]
            s = s.masked_fill(j > i + (s_k - s_q), float("-inf"))
        return s


def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, *, dropout_p=0.0,
                   lse_layout="packed", allow_fp32=False) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 varlen forward semantics: (out like q, lse in `lse_layout`)."""
    call = _Call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, allow_fp32)
    n = q.shape[1]
    if max_q == 1 and n > k.shape[1] and q.shape[0] != len(call.lq):
        # mha_varlen_fwd's seqlenq_ngroups_swapped: q.reshape({batch, n_kv, group, d})
        raise RuntimeError(f"shape '[{len(call.lq)}, {k.shape[1]}, {n // k.shape[1]}, "
                           f"{q.shape[-1]}]' is invalid for input of size {q.numel()}")
    out = torch.zeros(q.shape[0], n, v.shape[-1], dtype=torch.float32)
    lse = torch.full((n, q.shape[0]), math.inf)
    for _, rq, rk in call.sequences():
        if rq.stop == rq.start:
            continue
        s = call.scores(q[rq], k[rk], scale, causal)
        row_lse = torch.logsumexp(s, dim=-1) if s.shape[-1] else torch.full(s.shape[:-1], -math.inf)
        empty = row_lse == -math.inf
        p = torch.exp(s - row_lse.unsqueeze(-1)).masked_fill(empty.unsqueeze(-1), 0.0)
        vf = v[rk].float().repeat_interleave(call.group, dim=1)
        out[rq] = torch.einsum("hqk,khd->qhd", p, vf)
        lse[:, rq] = row_lse.masked_fill(empty, math.inf)  # FA2 writes +inf for rows without keys
    if lse_layout == "padded":
        padded = torch.full((len(call.lq), n, call.max_q), math.nan)
        for b, rq, _ in call.sequences():
            padded[b, :, : rq.stop - rq.start] = lse[:, rq]
        lse = padded
    elif lse_layout != "packed":
        raise ValueError(f"lse_layout {lse_layout!r}")
    return out.to(q.dtype), lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, *,
                    dropout_p=0.0, lse_layout="packed", allow_fp32=False):
    """FlashAttention-2 varlen backward for the GIVEN out / lse: (dq, dk, dv)."""
    call = _Call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, allow_fp32)
    n = q.shape[1]
    for name, t in (("dout", dout), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype or t.stride(-1) != 1:
            raise RuntimeError(f"{name} must be like q {tuple(q.shape)} {q.dtype}, got "
                               f"{tuple(t.shape)} {t.dtype}")
    expected = (n, q.shape[0]) if lse_layout == "packed" else (len(call.lq), n, call.max_q)
    if lse.dtype != torch.float32 or tuple(lse.shape) != expected or not lse.is_contiguous():
        raise RuntimeError(f"softmax_lse must be contiguous fp32 {expected}, got {lse.dtype} "
                           f"{tuple(lse.shape)}")
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    for b, rq, rk in call.sequences():
        if rq.stop == rq.start or rk.stop == rk.start:
            continue
        row_lse = lse[:, rq] if lse_layout == "packed" else lse[b, :, : rq.stop - rq.start]
        s = call.scores(q[rq], k[rk], scale, causal)
        p = torch.exp(s - row_lse.unsqueeze(-1))  # +inf lse -> weight 0; -inf would blow up
        do, o = dout[rq].float(), out[rq].float()
        ke = k[rk].float().repeat_interleave(call.group, dim=1)
        ve = v[rk].float().repeat_interleave(call.group, dim=1)
        dv_e = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, ve)
        delta = (do * o).sum(-1).transpose(0, 1)  # [n, s_q]
        ds = p * (dp - delta.unsqueeze(-1))
        dq[rq] = torch.einsum("hqk,khd->qhd", ds, ke) * scale
        dk_e = torch.einsum("hqk,qhd->khd", ds, q[rq].float()) * scale
        s_k = rk.stop - rk.start
        dk[rk] = dk_e.view(s_k, k.shape[1], call.group, -1).sum(2)
        dv[rk] = dv_e.view(s_k, v.shape[1], call.group, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _dense_as_varlen(q, k, v):
    """Dense [b, s, n, d] q/k/v as the varlen call over b uniform sequences (fake-internal)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise RuntimeError(f"dense {name} must be [batch, seqlen, heads, head_dim], got "
                               f"{tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
    b, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
    if k.shape[0] != b or v.shape[0] != b:
        raise RuntimeError("batch sizes of q, k and v differ")
    cu_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32)
    cu_k = torch.arange(0, (b + 1) * s_k, s_k, dtype=torch.int32)
    flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    return flat, cu_q, cu_k, max(s_q, 1), max(s_k, 1)


def dense_forward(q, k, v, scale, causal, *, dropout_p=0.0, allow_fp32=False):
    """FlashAttention-2 dense forward: (out [b, s_q, n, d] like q, lse fp32 [b, n, s_q])."""
    (qf, kf, vf), cu_q, cu_k, max_q, max_k = _dense_as_varlen(q, k, v)
    out, lse = varlen_forward(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale, causal,
                              dropout_p=dropout_p, allow_fp32=allow_fp32)
    b, s_q, n = q.shape[0], q.shape[1], q.shape[2]
    return out.view(b, s_q, n, -1), lse.view(n, b, s_q).transpose(0, 1).contiguous()


def dense_backward(dout, q, k, v, out, lse, scale, causal, *, dropout_p=0.0, allow_fp32=False):
    """FlashAttention-2 dense backward for the GIVEN out / lse [b, n, s_q]: (dq, dk, dv)."""
    (qf, kf, vf), cu_q, cu_k, max_q, max_k = _dense_as_varlen(q, k, v)
    b, s_q, n = q.shape[0], q.shape[1], q.shape[2]
    for name, t in (("dout", dout), ("out", out)):
        if t.shape != q.shape or t.stride(-1) != 1:
            raise RuntimeError(f"{name} must be like q {tuple(q.shape)} with a contiguous last "
                               f"dimension, got {tuple(t.shape)}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != (b, n, s_q) or not lse.is_contiguous():
        raise RuntimeError(f"softmax_lse must be contiguous fp32 {(b, n, s_q)}, got {lse.dtype} "
                           f"{tuple(lse.shape)}")
    grads = varlen_backward(dout.reshape(qf.shape), qf, kf, vf, out.reshape(qf.shape),
                            lse.transpose(0, 1).reshape(n, b * s_q).contiguous(), cu_q, cu_k,
                            max_q, max_k,
                            scale, causal, dropout_p=dropout_p, allow_fp32=allow_fp32)
    return tuple(g.view(t.shape) for g, t in zip(grads, (q, k, v)))


def _storage(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.untyped_storage().data_ptr()


class KernelCall(dict):
    """One recorded kernel call: its arguments (keyword-normalised) plus `storages`, the
    storage address of each tensor input (equal to a given view's when it was not copied)."""


class FakeAtenFlash:
    """`torch.ops.aten` stand-in with `_flash_attention_forward` / `_flash_attention_backward`
    (PyTorch 2.13 schema, varlen form). Records every call's keyword-normalised arguments."""

    def __init__(self, lse_layout: str = "packed", allow_fp32: bool = False) -> None:
        self.lse_layout = lse_layout
        self.allow_fp32 = allow_fp32
        self.forward_calls: List[Dict[str, object]] = []
        self.backward_calls: List[Dict[str, object]] = []

    def _flash_attention_forward(self, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                                 dropout_p, is_causal, return_debug_mask, *, scale=None,
                                 window_size_left=None, window_size_right=None, seqused_k=None,
                                 alibi_slopes=None, block_table=None, num_splits=None):
        """Forward; returns (output, softmax_logsumexp, rng_state, unused, debug_attn_mask)."""
        if (cum_seq_q is None) != (cum_seq_k is None):
            raise RuntimeError("cum_seq_q and cum_seq_k must both be given (varlen) or both "
                               "be None (dense)")
        if return_debug_mask or any(x is not None for x in (seqused_k, alibi_slopes, block_table)):
            raise RuntimeError("debug mask / seqused_k / alibi / paged KV are not used by the "
                               "backend")
        if window_size_left not in (None, -1) or window_size_right not in (None, -1):
            raise RuntimeError("the backend never sets a window")
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        dense = cum_seq_q is None
        self.forward_calls.append(KernelCall(
            max_q=max_q, max_k=max_k, is_causal=is_causal, scale=scale, dense=dense,
            cum_seq_q=None if dense else cum_seq_q.tolist(),
            cum_seq_k=None if dense else cum_seq_k.tolist(),
            heads=(query.shape[-2], key.shape[-2]),
            storages=tuple(_storage(t) for t in (query, key, value))))
        if dense:
            out, lse = dense_forward(query, key, value, scale, is_causal, dropout_p=dropout_p,
                                     allow_fp32=self.allow_fp32)
        else:
            out, lse = varlen_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                                      scale, is_causal, dropout_p=dropout_p,
                                      lse_layout=self.lse_layout, allow_fp32=self.allow_fp32)
        rng_state = torch.zeros(2, dtype=torch.uint64)
        unused = torch.zeros((), dtype=torch.uint64)
        return out, lse, rng_state, unused, torch.empty(0, dtype=query.dtype)

    def _flash_attention_backward(self, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                                  cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state,
                                  unused, *, scale=None, window_size_left=None,
                                  window_size_right=None):
        """Backward for the given out / logsumexp; returns (dq, dk, dv)."""
        if not isinstance(rng_state, torch.Tensor) or not isinstance(unused, torch.Tensor):
            raise RuntimeError("rng_state and unused must be tensors (the schema has no None)")
        if window_size_left not in (None, -1) or window_size_right not in (None, -1):
            raise RuntimeError("the backend never sets a window")
        if (cum_seq_q is None) != (cum_seq_k is None):
            raise RuntimeError("cum_seq_q and cum_seq_k must both be given or both be None")
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        dense = cum_seq_q is None
        self.backward_calls.append(KernelCall(
            max_q=max_q, max_k=max_k, is_causal=is_causal, scale=scale, dense=dense,
            cum_seq_q=None if dense else cum_seq_q.tolist(),
            cum_seq_k=None if dense else cum_seq_k.tolist(),
            storages=tuple(_storage(t) for t in (query, key, value, grad_out, out))))
        # PyTorch's wrapper makes grad_out and out contiguous itself (the kernel assumes so)
        grad_out, out = grad_out.contiguous(), out.contiguous()
        if dense:
            return dense_backward(grad_out, query, key, value, out, logsumexp, scale, is_causal,
                                  dropout_p=dropout_p, allow_fp32=self.allow_fp32)
        return varlen_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                               max_q, max_k, scale, is_causal, dropout_p=dropout_p,
                               lse_layout=self.lse_layout, allow_fp32=self.allow_fp32)


def _check_off(window, softcap, alibi_slopes, return_softmax=False, block_table=None,
               leftpad_k=None, seqused_k=None):
    if tuple(window) != (-1, -1) or softcap != 0.0 or alibi_slopes is not None or return_softmax \
            or block_table is not None or leftpad_k is not None or seqused_k is not None:
        raise RuntimeError("the backend must pass windows (-1, -1), softcap 0, no alibi / "
                           "softmax / paged KV")


class _Recorder:
    """What the fake flash-attn functions were called with: `calls` names each call in order
    ("forward", "backward" for varlen, "dense_forward", "dense_backward"); `records` holds a
    KernelCall per call (storages of the tensor inputs, `deterministic` for backwards)."""

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.records: List[KernelCall] = []

    def __call__(self, name, tensors, **extra) -> None:
        self.calls.append(name)
        self.records.append(KernelCall(name=name, storages=tuple(_storage(t) for t in tensors),
                                       **extra))


def _write(buffers, grads):
    for buffer, grad in zip(buffers, grads):
        buffer.copy_(grad)


def _make_2_6(allow_fp32: bool, record: _Recorder):
    """flash-attn 2.6.x: `window_size` tuple, forwards return 8 values, backwards return
    (dq, dk, dv, softmax_d) after writing into the given buffers."""

    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   dropout_p, softmax_scale, causal, window_size, softcap,
                                   alibi_slopes, return_softmax, block_table, leftpad_k=None,
                                   seqused_k=None):
        _check_off(window_size, softcap, alibi_slopes, return_softmax, block_table, leftpad_k,
                   seqused_k)
        record("forward", (q, k, v))
        out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale, causal, dropout_p=dropout_p, allow_fp32=allow_fp32)
        s_dmask = torch.empty(0, dtype=q.dtype)
        return out, q, k, v, out, lse, s_dmask, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                    softmax_scale, causal, window_size, softcap, alibi_slopes,
                                    deterministic, rng_state=None):
        _check_off(window_size, softcap, alibi_slopes)
        record("backward", (q, k, v, dout, out), deterministic=deterministic)
        _write((dq, dk, dv), varlen_backward(
            dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, softmax_scale, causal, dropout_p=dropout_p, allow_fp32=allow_fp32))
        return dq, dk, dv, torch.zeros(q.shape[1], q.shape[0])

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                            alibi_slopes, return_softmax):
        _check_off(window_size, softcap, alibi_slopes, return_softmax)
        record("dense_forward", (q, k, v))
        out, lse = dense_forward(q, k, v, softmax_scale, causal, dropout_p=dropout_p,
                                 allow_fp32=allow_fp32)
        return out, q, k, v, out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes,
                             deterministic, rng_state=None):
        _check_off(window_size, softcap, alibi_slopes)
        record("dense_backward", (q, k, v, dout, out), deterministic=deterministic)
        _write((dq, dk, dv), dense_backward(dout, q, k, v, out, softmax_lse, softmax_scale,
                                            causal, dropout_p=dropout_p, allow_fp32=allow_fp32))
        return dq, dk, dv, torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    return (_flash_attn_varlen_forward, _flash_attn_varlen_backward, _flash_attn_forward,
            _flash_attn_backward)


def _make_2_7(allow_fp32: bool, record: _Recorder, extra: Optional[str]):
    """flash-attn 2.7.x / 2.8.x: `window_size_left/right`, torch.library custom ops; forwards
    return (out, lse, S_dmask, rng_state), backwards write dq/dk/dv and return softmax_d.
    `extra`: None, "optional" (a new varlen-forward parameter with a default) or "required"
    (without one)."""
    namespace = f"mvfakeflash{next(_counter)}"

    def forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                     softmax_scale, causal, window_size_left, window_size_right, softcap,
                     alibi_slopes, return_softmax, block_table, leftpad_k, seqused_k):
        _check_off((window_size_left, window_size_right), softcap, alibi_slopes, return_softmax,
                   block_table, leftpad_k, seqused_k)
        record("forward", (q, k, v))
        out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale, causal, dropout_p=dropout_p, allow_fp32=allow_fp32)
        return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)

    # real type objects (no postponed annotations in this file): custom_op reads them
    T, OT = torch.Tensor, Optional[torch.Tensor]
    if extra is None:
        @torch.library.custom_op(f"{namespace}::_flash_attn_varlen_forward", mutates_args=())
        def _flash_attn_varlen_forward(
                q: T, k: T, v: T, cu_seqlens_q: T, cu_seqlens_k: T, max_seqlen_q: int,
                max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
                window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
                alibi_slopes: OT = None, return_softmax: bool = False, block_table: OT = None,
                leftpad_k: OT = None, seqused_k: OT = None) -> Tuple[T, T, T, T]:
            return forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                dropout_p, softmax_scale, causal, window_size_left,
                                window_size_right, softcap, alibi_slopes, return_softmax,
                                block_table, leftpad_k, seqused_k)
    elif extra == "optional":
        @torch.library.custom_op(f"{namespace}::_flash_attn_varlen_forward", mutates_args=())
        def _flash_attn_varlen_forward(
                q: T, k: T, v: T, cu_seqlens_q: T, cu_seqlens_k: T, max_seqlen_q: int,
                max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
                window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
                alibi_slopes: OT = None, return_softmax: bool = False, block_table: OT = None,
                leftpad_k: OT = None, seqused_k: OT = None, num_splits: int = 1
        ) -> Tuple[T, T, T, T]:
            return forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                dropout_p, softmax_scale, causal, window_size_left,
                                window_size_right, softcap, alibi_slopes, return_softmax,
                                block_table, leftpad_k, seqused_k)
    elif extra == "required":
        @torch.library.custom_op(f"{namespace}::_flash_attn_varlen_forward", mutates_args=())
        def _flash_attn_varlen_forward(
                q: T, k: T, v: T, cu_seqlens_q: T, cu_seqlens_k: T, max_seqlen_q: int,
                max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
                sink_tokens: int, window_size_left: int = -1, window_size_right: int = -1,
                softcap: float = 0.0, alibi_slopes: OT = None, return_softmax: bool = False,
                block_table: OT = None, leftpad_k: OT = None, seqused_k: OT = None
        ) -> Tuple[T, T, T, T]:
            return forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                dropout_p, softmax_scale, causal, window_size_left,
                                window_size_right, softcap, alibi_slopes, return_softmax,
                                block_table, leftpad_k, seqused_k)
    else:
        raise ValueError(f"extra {extra!r}")

    @torch.library.custom_op(f"{namespace}::_flash_attn_varlen_backward",
                             mutates_args=("dq", "dk", "dv"))
    def _flash_attn_varlen_backward(
            dout: T, q: T, k: T, v: T, out: T, softmax_lse: T, dq: OT, dk: OT, dv: OT,
            cu_seqlens_q: T, cu_seqlens_k: T, max_seqlen_q: int, max_seqlen_k: int,
            dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
            window_size_right: int, softcap: float, alibi_slopes: OT, deterministic: bool,
            rng_state: OT = None) -> T:
        _check_off((window_size_left, window_size_right), softcap, alibi_slopes)
        record("backward", (q, k, v, dout, out), deterministic=deterministic)
        _write((dq, dk, dv), varlen_backward(
            dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, softmax_scale, causal, dropout_p=dropout_p, allow_fp32=allow_fp32))
        return torch.zeros(q.shape[1], q.shape[0])

    @torch.library.custom_op(f"{namespace}::_flash_attn_forward", mutates_args=())
    def _flash_attn_forward(
            q: T, k: T, v: T, dropout_p: float, softmax_scale: float, causal: bool,
            window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: OT,
            return_softmax: bool) -> Tuple[T, T, T, T]:
        _check_off((window_size_left, window_size_right), softcap, alibi_slopes, return_softmax)
        record("dense_forward", (q, k, v))
        out, lse = dense_forward(q, k, v, softmax_scale, causal, dropout_p=dropout_p,
                                 allow_fp32=allow_fp32)
        return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)

    @torch.library.custom_op(f"{namespace}::_flash_attn_backward",
                             mutates_args=("dq", "dk", "dv"))
    def _flash_attn_backward(
            dout: T, q: T, k: T, v: T, out: T, softmax_lse: T, dq: OT, dk: OT, dv: OT,
            dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
            window_size_right: int, softcap: float, alibi_slopes: OT, deterministic: bool,
            rng_state: OT = None) -> T:
        _check_off((window_size_left, window_size_right), softcap, alibi_slopes)
        record("dense_backward", (q, k, v, dout, out), deterministic=deterministic)
        _write((dq, dk, dv), dense_backward(dout, q, k, v, out, softmax_lse, softmax_scale,
                                            causal, dropout_p=dropout_p, allow_fp32=allow_fp32))
        return torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    return (_flash_attn_varlen_forward, _flash_attn_varlen_backward, _flash_attn_forward,
            _flash_attn_backward)


def fake_flash_attn_modules(style: str = "2.7", *, allow_fp32: bool = False,
                            extra: Optional[str] = None) -> Dict[str, types.ModuleType]:
    """{"flash_attn": package, "flash_attn.flash_attn_interface": interface} to put in
    sys.modules. `interface.calls` lists the calls in order ("forward" / "backward" for varlen,
    "dense_forward" / "dense_backward"); `interface.records` their KernelCall entries."""
    record = _Recorder()
    if style == "2.6":
        if extra is not None:
            raise ValueError("extra parameters are emulated on the 2.7 style only")
        functions = _make_2_6(allow_fp32, record)
        version = "2.6.3"
    elif style == "2.7":
        functions = _make_2_7(allow_fp32, record, extra)
        version = "2.8.3" if extra is None else "9.9.9"
    else:
        raise ValueError(f"style {style!r}: '2.6' or '2.7'")
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    (interface._flash_attn_varlen_forward, interface._flash_attn_varlen_backward,
     interface._flash_attn_forward, interface._flash_attn_backward) = functions
    interface.calls = record.calls
    interface.records = record.records
    package = types.ModuleType("flash_attn")
    package.__version__ = version
    package.__path__ = []  # a package, so the submodule import resolves from sys.modules
    package.flash_attn_interface = interface
    return {"flash_attn": package, "flash_attn.flash_attn_interface": interface}


__all__ = ["FakeAtenFlash", "KernelCall", "dense_backward", "dense_forward",
           "fake_flash_attn_modules", "varlen_backward", "varlen_forward"]
