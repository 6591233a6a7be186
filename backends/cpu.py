"""CPU backend: the reference every other backend is tested against, and the one CI runs.

Attention uses PyTorch's CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`), which
returns the log-sum-exp and whose backward accepts a given output and log-sum-exp - exactly what
ring attention needs. Packed input runs the kernel per sequence, with the lengths read from the
params' host tuples (no device sync). The kernel's causal mask is top-left; a bottom-right mask
with s_q != s_kv is computed as two kernel calls merged by log-sum-exp (see `_dense_forward`).
Fused layers are the plain reference ops. Peak memory is the growth of the process's resident
set (VmHWM) since the last reset, because CPU tensors have no allocator statistics. To make
that growth track live tensors, the backend tells glibc, when it is created, to serve every
allocation of 64 KiB or more with its own mmap (and so return it on free) instead of recycling
freed heap memory invisibly.
A key set of length 0 gives fully masked rows: output 0, lse -inf (the kernel is not called).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional, Tuple

import torch

from backends import reference
from backends.attention_params import AttentionParams
from backends.base import Backend, default_scale

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _read_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class CPUBackend(reference.ReferenceFusedLayers, Backend):
    """Plain-PyTorch kernels on the host CPU, gloo for collectives."""

    name = "cpu"
    dist_backend = "gloo"
    default_compute_dtype = torch.float32  # CPU bf16 matmuls are slow and emulated

    def __init__(self) -> None:
        self._rss_at_reset_kb = 0
        self._peak_supported = os.path.exists("/proc/self/clear_refs")
        # before any measured allocation, so no freed heap memory is recycled invisibly later
        self._mmap_large_allocations()

    @classmethod
    def probe(cls) -> Optional[str]:
        return None

    def device(self, local_rank: Optional[int] = None) -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def _mmap_large_allocations() -> None:
        # M_MMAP_THRESHOLD (-3) set explicitly also turns off glibc's dynamic threshold, which
        # would otherwise rise after the first large free and hide reuse from the RSS.
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give freed heap tops back at once
            libc.malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: peaks may undercount reused memory

    def reset_peak_memory_stats(self) -> None:
        # Writing "5" to clear_refs resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0).
        if self._peak_supported:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._rss_at_reset_kb = _read_status_kb("VmRSS")
            except OSError:
                self._peak_supported = False

    def max_memory_allocated(self) -> int:
        if not self._peak_supported:
            return 0
        return max(0, _read_status_kb("VmHWM") - self._rss_at_reset_kb) * 1024

    # ---------------------------------------------------------------- attention
    @staticmethod
    def _kernel_forward(q, k, v, causal, scale):
        """One call of the CPU flash kernel (top-left causal or none) on [b, s, n, d]."""
        if k.shape[1] == 0 or q.shape[1] == 0:
            # no key at all: every row is fully masked (output 0, lse -inf); the CPU kernel
            # would divide by zero (SIGFPE) on an empty key axis
            out = q.new_zeros(q.shape[:-1] + v.shape[-1:])
            return out, q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"),
                                   dtype=torch.float32)
        # kernel layout is [b, n, s, d]; ours is [b, s, n, d]
        out, lse = _flash_cpu(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0,
                              causal, scale=scale)
        return out.transpose(1, 2), lse

    @staticmethod
    def _kernel_backward(dout, q, k, v, out, lse, causal, scale):
        if k.shape[1] == 0 or q.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        dq, dk, dv = _flash_cpu_backward(t(dout), t(q), t(k), t(v), t(out), lse.contiguous(),
                                         0.0, causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    @classmethod
    def _dense_forward(cls, q, k, v, mask, scale):
        """[b, s, n, d] attention for one mask kind. The kernel's causal is top-left, so a
        bottom-right mask with s_q != s_kv is split on the key (or query) axis, which needs
        no [s_q, s_kv] mask tensor: with s_kv > s_q, keys [0, off) are seen by every row and
        keys [off, s_kv) form a top-left causal square; the two blocks merge by lse. With
        s_q > s_kv the first s_q - s_kv rows see no key and the rest form the square."""
        s_q, s_kv = q.shape[1], k.shape[1]
        off = s_kv - s_q
        if mask == "none" or (mask == "causal_bottom_right" and s_q == 0):
            return cls._kernel_forward(q, k, v, False, scale)
        if mask == "causal" or off == 0:
            return cls._kernel_forward(q, k, v, True, scale)
        if off < 0:
            out, lse = cls._kernel_forward(q[:, -off:], k, v, True, scale)
            dead = q.new_zeros((q.shape[0], -off) + out.shape[2:])
            dead_lse = lse.new_full(lse.shape[:2] + (-off,), float("-inf"))
            return torch.cat([dead, out], dim=1), torch.cat([dead_lse, lse], dim=2)
        out_a, lse_a = cls._kernel_forward(q, k[:, :off], v[:, :off], False, scale)
        out_b, lse_b = cls._kernel_forward(q, k[:, off:], v[:, off:], True, scale)
        lse = torch.logaddexp(lse_a, lse_b)
        weight_a = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)  # [b, s, n, 1]
        weight_b = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
        acc = torch.promote_types(q.dtype, torch.float32)
        out = out_a.to(acc) * weight_a + out_b.to(acc) * weight_b
        return out.to(q.dtype), lse

    @classmethod
    def _dense_backward(cls, dout, q, k, v, out, lse, mask, scale):
        """Gradients of `_dense_forward` for the given (possibly merged) out and lse: each
        block's backward under the final statistics is exactly that block's share."""
        s_q, s_kv = q.shape[1], k.shape[1]
        off = s_kv - s_q
        if mask == "none" or (mask == "causal_bottom_right" and s_q == 0):
            return cls._kernel_backward(dout, q, k, v, out, lse, False, scale)
        if mask == "causal" or off == 0:
            return cls._kernel_backward(dout, q, k, v, out, lse, True, scale)
        if off < 0:
            dq, dk, dv = cls._kernel_backward(dout[:, -off:], q[:, -off:], k, v, out[:, -off:],
                                              lse[:, :, -off:], True, scale)
            return torch.cat([torch.zeros_like(q[:, :-off]), dq], dim=1), dk, dv
        dq_a, dk_a, dv_a = cls._kernel_backward(dout, q, k[:, :off], v[:, :off], out, lse,
                                                False, scale)
        dq_b, dk_b, dv_b = cls._kernel_backward(dout, q, k[:, off:], v[:, off:], out, lse,
                                                True, scale)
        return (dq_a + dq_b, torch.cat([dk_a, dk_b], dim=1), torch.cat([dv_a, dv_b], dim=1))

    def attention_forward(self, q, k, v, params: AttentionParams
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = default_scale(q.shape[-1], params.scale)
        if not params.is_packed:
            return self._dense_forward(q, k, v, params.mask, scale)
        lq, lk = list(params.seqlens_q()), list(params.seqlens_kv())
        outs, lses = [], []
        for qs, ks, vs in zip(q.split(lq), k.split(lk), v.split(lk)):
            o, l = self._dense_forward(qs[None], ks[None], vs[None], params.mask, scale)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)

    def attention_backward(self, dout, q, k, v, out, lse, params: AttentionParams):
        scale = default_scale(q.shape[-1], params.scale)
        if not params.is_packed:
            return self._dense_backward(dout, q, k, v, out, lse, params.mask, scale)
        lq, lk = list(params.seqlens_q()), list(params.seqlens_kv())
        grads = ([], [], [])
        for dos, qs, ks, vs, os_, ls in zip(dout.split(lq), q.split(lq), k.split(lk),
                                            v.split(lk), out.split(lq), lse.split(lq, dim=-1)):
            g = self._dense_backward(dos[None], qs[None], ks[None], vs[None], os_[None],
                                     ls[None], params.mask, scale)
            for acc, x in zip(grads, g):
                acc.append(x[0])
        return tuple(torch.cat(g) for g in grads)

    # --------------------------------------------------------------- engines
    def adapt_megatron(self) -> None:
        # megatron-core calls torch.cuda in several places; the shims live in one module.
        from backends.megatron_cpu import apply_megatron_cpu_adaptations

        apply_megatron_cpu_adaptations()

