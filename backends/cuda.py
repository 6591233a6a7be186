"""CUDA backend: PyTorch's own flash-attention kernels (no extra package needed).

Dense and packed input both go through the varlen flash kernel (`_flash_attention_forward` with
cumulative lengths): a dense [b, s, n, d] batch is b sequences of length s. The kernel returns
the log-sum-exp and its backward accepts a given output and log-sum-exp, as ring attention needs.
The flash kernel needs fp16/bf16 and head_dim <= 256 with head_dim % 8 == 0; other inputs (fp32
parity tests, odd head sizes) use the plain-PyTorch reference math, which is exact but
materialises the score matrix. Fused layers are expressed with torch ops that the CUDA
compiler stack fuses well; numerics match the CPU reference.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from backends import reference
from backends.base import Backend, default_scale


def _flash_supported(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0


class CUDABackend(Backend):
    """NVIDIA GPUs: torch flash kernels, NCCL collectives."""

    name = "cuda"
    dist_backend = "nccl"

    def __init__(self) -> None:
        self._lse_unpadded: Optional[bool] = None
        self._warned_fallback = False

    @classmethod
    def probe(cls) -> Optional[str]:
        if not torch.cuda.is_available():
            reason = ("this torch build has no CUDA support" if torch.version.cuda is None
                      else "no NVIDIA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            return (f"backend 'cuda' cannot run: {reason}; install a CUDA build of torch on a GPU "
                    "host, or choose MINDSPEED_VITA_BACKEND=cpu")
        return None

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank)

    def set_device(self, local_rank: int = 0) -> None:
        torch.cuda.set_device(local_rank)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def max_memory_allocated(self) -> int:
        return int(torch.cuda.max_memory_allocated())

    # ---------------------------------------------------------------- attention
    @staticmethod
    def _as_varlen(q, k, v, cu_q, cu_kv, max_q, max_kv):
        """Dense [b,s,n,d] -> packed [b*s,n,d] with uniform cumulative lengths."""
        if cu_q is not None:
            cu_kv = cu_q if cu_kv is None else cu_kv
            max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
            max_kv = int(max_kv) if max_kv is not None else int((cu_kv[1:] - cu_kv[:-1]).max())
            return q, k, v, cu_q.to(torch.int32), cu_kv.to(torch.int32), max_q, max_kv
        b, s_q, s_kv = q.shape[0], q.shape[1], k.shape[1]
        dev = q.device
        cu_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=dev)
        cu_kv = torch.arange(0, (b + 1) * s_kv, s_kv, dtype=torch.int32, device=dev)
        return (q.reshape(b * s_q, *q.shape[2:]), k.reshape(b * s_kv, *k.shape[2:]),
                v.reshape(b * s_kv, *v.shape[2:]), cu_q, cu_kv, s_q, s_kv)

    def _lse_to_ours(self, lse, cu_q):
        """Kernel lse -> [n, t]. Older kernels return padded [b, n, max_q]."""
        if lse.dim() == 2:
            return lse
        lens = (cu_q[1:] - cu_q[:-1]).tolist()
        return torch.cat([lse[i, :, :l] for i, l in enumerate(lens)], dim=-1)

    def _lse_to_kernel(self, lse, cu_q, max_q):
        if self._lse_is_unpadded():
            return lse.contiguous()
        lens = (cu_q[1:] - cu_q[:-1]).tolist()
        out = lse.new_zeros(len(lens), lse.shape[0], max_q)
        for i, (start, l) in enumerate(zip(cu_q[:-1].tolist(), lens)):
            out[i, :, :l] = lse[:, start:start + l]
        return out

    def _lse_is_unpadded(self) -> bool:
        if self._lse_unpadded is None:
            q = torch.zeros(3, 1, 8, dtype=torch.bfloat16, device="cuda")
            cu = torch.tensor([0, 1, 3], dtype=torch.int32, device="cuda")
            lse = torch.ops.aten._flash_attention_forward(q, q, q, cu, cu, 2, 2, 0.0, False,
                                                          False)[1]
            self._lse_unpadded = lse.dim() == 2
        return self._lse_unpadded

    def _fallback(self, what: str) -> None:
        if not self._warned_fallback:
            warnings.warn(f"cuda backend: {what} is not supported by the flash kernel; "
                          "using the reference attention (exact, memory O(s^2))")
            self._warned_fallback = True

    def attention_forward(self, q, k, v, *, causal, scale=None, cu_seqlens_q=None,
                          cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = default_scale(q.shape[-1], scale)
        if not _flash_supported(q):
            if q.dtype != torch.float32:
                self._fallback(f"dtype {q.dtype} / head_dim {q.shape[-1]}")
            return reference.attention_reference(q, k, v, causal=causal, scale=scale,
                                                 cu_seqlens_q=cu_seqlens_q,
                                                 cu_seqlens_kv=cu_seqlens_kv)
        dense = cu_seqlens_q is None
        qv, kv_, vv, cu_q, cu_kv, mq, mk = self._as_varlen(q, k, v, cu_seqlens_q, cu_seqlens_kv,
                                                          max_seqlen_q, max_seqlen_kv)
        out, lse = torch.ops.aten._flash_attention_forward(
            qv, kv_, vv, cu_q, cu_kv, mq, mk, 0.0, causal, False, scale=scale)[:2]
        lse = self._lse_to_ours(lse, cu_q)  # [n, t]
        if dense:
            b, s = q.shape[0], q.shape[1]
            return out.view(q.shape[:-1] + out.shape[-1:]), lse.view(-1, b, s).transpose(0, 1)
        return out, lse

    def attention_backward(self, dout, q, k, v, out, lse, *, causal, scale=None,
                           cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None,
                           max_seqlen_kv=None):
        scale = default_scale(q.shape[-1], scale)
        if not _flash_supported(q):
            return reference.attention_backward_reference(
                dout, q, k, v, out, lse, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_kv=cu_seqlens_kv)
        dense = cu_seqlens_q is None
        qv, kv_, vv, cu_q, cu_kv, mq, mk = self._as_varlen(q, k, v, cu_seqlens_q, cu_seqlens_kv,
                                                          max_seqlen_q, max_seqlen_kv)
        if dense:
            lse = lse.transpose(0, 1).reshape(lse.shape[1], -1)  # [b,n,s] -> [n, b*s]
            dout, out = dout.reshape(qv.shape[:-1] + dout.shape[-1:]), out.reshape(
                qv.shape[:-1] + out.shape[-1:])
        rng = torch.zeros(2, dtype=torch.int64, device=q.device)  # dropout is off
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), qv, kv_, vv, out.contiguous(), self._lse_to_kernel(lse, cu_q, mq),
            cu_q, cu_kv, mq, mk, 0.0, causal, rng, rng.new_empty(0), scale=scale)
        if dense:
            return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
        return dq, dk, dv

    # ------------------------------------------------------------ fused layers
    def rms_norm(self, x, weight, eps):
        return reference.rms_norm_reference(x, weight, eps)

    def apply_rotary(self, x, cos, sin):
        return reference.rotary_reference(x, cos, sin)

    def swiglu(self, x):
        return reference.swiglu_reference(x)
