"""CPU backend: the reference every other backend is tested against, and the one CI runs.

Attention uses PyTorch's CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`), which
returns the log-sum-exp and whose backward accepts a given output and log-sum-exp - exactly what
ring attention needs. Packed input runs the kernel per sequence. Fused layers are the plain
reference ops. Peak memory is the growth of the process's resident set (VmHWM) since the last
reset, because CPU tensors have no allocator statistics. To make that growth track live tensors,
the backend tells glibc, when it is created, to serve every allocation of 64 KiB or more with
its own mmap (and so return it on free) instead of recycling freed heap memory invisibly.
A key set of length 0 gives fully masked rows: output 0, lse -inf (the kernel is not called).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional, Tuple

import torch

from backends import reference
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
    def _dense_forward(q, k, v, causal, scale):
        if k.shape[1] == 0:
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
    def _dense_backward(dout, q, k, v, out, lse, causal, scale):
        if k.shape[1] == 0 or q.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        dq, dk, dv = _flash_cpu_backward(t(dout), t(q), t(k), t(v), t(out), lse.contiguous(),
                                         0.0, causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    def attention_forward(self, q, k, v, *, causal, scale=None, cu_seqlens_q=None,
                          cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = default_scale(q.shape[-1], scale)
        if cu_seqlens_q is None:
            return self._dense_forward(q, k, v, causal, scale)
        lq, lk = _lengths(cu_seqlens_q), _lengths(cu_seqlens_kv, cu_seqlens_q)
        outs, lses = [], []
        for qs, ks, vs in zip(q.split(lq), k.split(lk), v.split(lk)):
            if qs.shape[0] == 0:
                outs.append(qs)
                lses.append(qs.new_empty(q.shape[1], 0, dtype=torch.float32))
                continue
            o, l = self._dense_forward(qs[None], ks[None], vs[None], causal, scale)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)

    def attention_backward(self, dout, q, k, v, out, lse, *, causal, scale=None,
                           cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None,
                           max_seqlen_kv=None):
        scale = default_scale(q.shape[-1], scale)
        if cu_seqlens_q is None:
            return self._dense_backward(dout, q, k, v, out, lse, causal, scale)
        lq, lk = _lengths(cu_seqlens_q), _lengths(cu_seqlens_kv, cu_seqlens_q)
        grads = ([], [], [])
        for dos, qs, ks, vs, os_, ls in zip(dout.split(lq), q.split(lq), k.split(lk),
                                            v.split(lk), out.split(lq), lse.split(lq, dim=-1)):
            if qs.shape[0] == 0 or ks.shape[0] == 0:
                for acc, x in zip(grads, (qs, ks, vs)):
                    acc.append(torch.zeros_like(x))
                continue
            g = self._dense_backward(dos[None], qs[None], ks[None], vs[None], os_[None],
                                     ls[None], causal, scale)
            for acc, x in zip(grads, g):
                acc.append(x[0])
        return tuple(torch.cat(g) for g in grads)

    # --------------------------------------------------------------- engines
    def adapt_megatron(self) -> None:
        # megatron-core calls torch.cuda in several places; the shims live in one module.
        from backends.megatron_cpu import apply_megatron_cpu_adaptations

        apply_megatron_cpu_adaptations()


def _lengths(cu: Optional[torch.Tensor], fallback: Optional[torch.Tensor] = None):
    cu = fallback if cu is None else cu
    values = [int(x) for x in cu.tolist()]
    if not values or values[0] != 0:
        raise ValueError(f"cu_seqlens must start with 0 (megatron convention), got {values[:8]}")
    return [b - a for a, b in zip(values, values[1:])]
