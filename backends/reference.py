"""Plain-PyTorch reference kernels: the oracle every backend kernel is tested against.

Everything here materialises the full score matrix in fp32; it is meant to be obviously right,
not fast. Conventions are those of `backends.base` (BSND dense, THD packed with leading-0
cumulative lengths, the mask kinds of `backends.attention_params`, fp32 lse, fully masked rows
-> output 0 and lse -inf).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from backends.attention_params import AttentionParams
from backends.base import default_scale


def _expand_kv(x: torch.Tensor, n_q: int) -> torch.Tensor:
    """[b, s, n_kv, d] -> [b, s, n_q, d]; query head h uses kv head h // (n_q // n_kv)."""
    n_kv = x.shape[2]
    if n_q % n_kv:
        raise ValueError(f"query heads ({n_q}) must be a multiple of key/value heads ({n_kv})")
    return x.repeat_interleave(n_q // n_kv, dim=2)


def keep_mask(s_q: int, s_kv: int, mask: str, device=None) -> Optional[torch.Tensor]:
    """Boolean [s_q, s_kv] of the mask kind `mask`, True = attend; None when all is kept.

    "causal": j <= i (top-left); "causal_bottom_right": j <= i + s_kv - s_q.
    """
    if mask == "none":
        return None
    offset = {"causal": 0, "causal_bottom_right": s_kv - s_q}[mask]
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_kv, device=device)[None, :]
    return j <= i + offset


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so the oracle can be checked exactly)."""
    return torch.promote_types(x.dtype, torch.float32)


def _dense_scores(q, k, mask, scale):
    """fp32 scaled scores [b, n, s_q, s_kv] with -inf where masked."""
    k = _expand_kv(k, q.shape[2])
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(_acc(q)), k.to(_acc(q))) * scale
    keep = keep_mask(q.shape[1], k.shape[1], mask, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _dense_forward(q, k, v, mask, scale):
    s = _dense_scores(q, k, mask, scale)
    lse = torch.logsumexp(s, dim=-1)  # [b, n, s_q]; -inf on fully masked rows
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    v = _expand_kv(v, q.shape[2]).to(_acc(q))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out.to(q.dtype), lse


def _dense_backward(dout, q, k, v, out, lse, mask, scale):
    n_q, n_kv = q.shape[2], k.shape[2]
    s = _dense_scores(q, k, mask, scale)
    acc = _acc(q)
    p = torch.exp(s - lse.to(acc).unsqueeze(-1)).nan_to_num(0.0)  # uses the GIVEN lse
    do, o = dout.to(acc), out.to(acc)
    ke, ve = _expand_kv(k, n_q).to(acc), _expand_kv(v, n_q).to(acc)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, ve)
    delta = (do * o).sum(-1).transpose(1, 2)  # [b, n, s_q]
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(acc)) * scale
    group = n_q // n_kv
    b, s_kv, _, d = dk.shape
    dk = dk.view(b, s_kv, n_kv, group, d).sum(3)
    dv = dv.view(b, s_kv, n_kv, group, dv.shape[-1]).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        params: AttentionParams) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: (out in q's dtype, fp32 lse). Dense [b,s,n,d] or packed [t,n,d]."""
    scale = default_scale(q.shape[-1], params.scale)
    if not params.is_packed:
        return _dense_forward(q, k, v, params.mask, scale)
    lq, lk = list(params.seqlens_q()), list(params.seqlens_kv())
    outs, lses = [], []
    for qs, ks, vs in zip(q.split(lq), k.split(lk), v.split(lk)):
        o, l = _dense_forward(qs[None], ks[None], vs[None], params.mask, scale)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def attention_backward_reference(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, params: AttentionParams,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference gradients of attention for the given out / lse (not recomputed ones)."""
    scale = default_scale(q.shape[-1], params.scale)
    if not params.is_packed:
        return _dense_backward(dout, q, k, v, out, lse, params.mask, scale)
    lq, lk = list(params.seqlens_q()), list(params.seqlens_kv())
    grads = [[], [], []]
    for dos, qs, ks, vs, os_, ls in zip(dout.split(lq), q.split(lq), k.split(lk), v.split(lk),
                                        out.split(lq), lse.split(lq, dim=-1)):
        g = _dense_backward(dos[None], qs[None], ks[None], vs[None], os_[None], ls[None],
                            params.mask, scale)
        for acc, t in zip(grads, g):
            acc.append(t[0])
    return tuple(torch.cat(g) for g in grads)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2 RMSNorm: statistics in fp32, normalised value cast back to x.dtype, then * weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) over the last dim (GPT-NeoX / Megatron half rotation)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-rotation rotary embedding with full-width cos/sin."""
    return x * cos + rotate_half(x) * sin


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with [gate; up] concatenated on the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class ReferenceFusedLayers:
    """`Backend.rms_norm / apply_rotary / swiglu` as the reference ops above: the fused layers
    of backends with no fused kernels of their own (CPU; CUDA, where torch's compiler stack
    fuses these ops well). Listed before `Backend` in the bases so it provides them."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm_reference(x, weight, eps)

    def apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotary_reference(x, cos, sin)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_reference(x)
