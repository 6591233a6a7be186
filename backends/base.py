"""The one seam for hardware: what every backend (cpu, cuda, npu) provides.

Model, trainer and inference code hold a `Backend` and call its methods; they never test the
device type and never import an accelerator package.

Attention conventions shared by every backend (so ring attention and decode can merge blocks):

* Dense input is `[b, s, n, d]` (BSND). `q` has `n_q` heads, `k`/`v` have `n_kv` heads with
  `n_q % n_kv == 0`; query head `h` uses kv head `h // (n_q // n_kv)` (grouped, like
  `repeat_interleave`).
* Packed variable-length input is `[t, n, d]` (THD) with `cu_seqlens_q` / `cu_seqlens_kv`:
  int32 tensors of cumulative lengths WITH a leading 0 (megatron / flash-attn convention),
  e.g. lengths [3, 5] -> [0, 3, 8]. Backends that need another convention convert inside.
* `causal=True` is top-left aligned: query row i sees keys j <= i (per sequence when packed).
  Ring attention only uses it on diagonal blocks where s_q == s_kv.
* `scale` defaults to `1 / sqrt(d)`.
* Log-sum-exp is fp32, natural log of the scaled, masked scores: `[b, n_q, s_q]` dense,
  `[n_q, t_q]` packed. A query row that sees no key has lse = -inf and output 0.
* `attention_backward` takes the (possibly merged) `out` and `lse` it is given and returns the
  exact gradients for this block under those statistics (what a ring backward needs).
"""
from __future__ import annotations

import abc
import math
from typing import Optional, Tuple

import torch


class BackendUnavailableError(RuntimeError):
    """A backend was requested on a machine that cannot run it.

    The message is one sentence that says what is missing and how to fix it; the CLI prints it
    and exits non-zero without a traceback.
    """


class Backend(abc.ABC):
    """Hardware layer: device, distributed backend, kernels and engine adaptations."""

    #: short name used in configs and `MINDSPEED_VITA_BACKEND`: "cpu" | "cuda" | "npu"
    name: str = ""
    #: torch.distributed backend name: "gloo" | "nccl" | "hccl"
    dist_backend: str = ""

    #: dtype benchmarks and demos compute in by default (bf16 on accelerators, fp32 on CPU)
    default_compute_dtype: torch.dtype = torch.bfloat16

    #: keyword options (config section `backend_options`) this backend's constructor takes;
    #: `get_backend` drops the others, so one config runs on every backend
    option_names: Tuple[str, ...] = ()

    # ------------------------------------------------------------------ runtime
    @classmethod
    @abc.abstractmethod
    def probe(cls) -> Optional[str]:
        """Return None when this backend can run here, else one sentence saying why not."""

    @abc.abstractmethod
    def device(self, local_rank: Optional[int] = None) -> torch.device:
        """The torch device of this process.

        Without an argument: the accelerator `set_device` bound (the current device), so model
        code on rank r of a node lands on accelerator r. With `local_rank`: that accelerator.
        """

    def set_device(self, local_rank: int = 0) -> None:
        """Bind this process to its accelerator before the process group starts (the launcher's
        LOCAL_RANK); `device()` then returns it."""

    def seed(self, seed: int) -> None:
        """Seed the host and device generators."""
        torch.manual_seed(seed)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""

    def reset_peak_memory_stats(self) -> None:
        """Start a new peak-memory window."""

    @abc.abstractmethod
    def max_memory_allocated(self) -> int:
        """Peak bytes allocated on the device since the last reset (host RSS peak on CPU)."""

    # ---------------------------------------------------------------- attention
    @abc.abstractmethod
    def attention_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: Optional[float] = None,
        cu_seqlens_q: Optional[torch.Tensor] = None,
        cu_seqlens_kv: Optional[torch.Tensor] = None,
        max_seqlen_q: Optional[int] = None,
        max_seqlen_kv: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention output (q's dtype, q's layout) and fp32 log-sum-exp (see module doc)."""

    @abc.abstractmethod
    def attention_backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: Optional[float] = None,
        cu_seqlens_q: Optional[torch.Tensor] = None,
        cu_seqlens_kv: Optional[torch.Tensor] = None,
        max_seqlen_q: Optional[int] = None,
        max_seqlen_kv: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) for the given out/lse; dk/dv summed over each GQA group."""

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: Optional[float] = None,
        cu_seqlens_q: Optional[torch.Tensor] = None,
        cu_seqlens_kv: Optional[torch.Tensor] = None,
        max_seqlen_q: Optional[int] = None,
        max_seqlen_kv: Optional[int] = None,
    ) -> torch.Tensor:
        """Differentiable attention built from `attention_forward` / `attention_backward`."""
        return _BackendAttention.apply(
            self, q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv
        )

    # ------------------------------------------------------------ fused layers
    @abc.abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dim, statistics in fp32, result cast to x.dtype then scaled
        by `weight` (Qwen2 / transformers semantics)."""

    @abc.abstractmethod
    def apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Half-rotation RoPE: `x * cos + rotate_half(x) * sin` with rotate_half(x) =
        cat(-x2, x1). cos/sin have the full head dim and broadcast against x."""

    @abc.abstractmethod
    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """`silu(a) * b` where `a, b = x.chunk(2, dim=-1)` (megatron's fused fc1 layout)."""

    # --------------------------------------------------------------- engines
    def adapt_megatron(self) -> None:
        """Apply the adaptations megatron-core needs on this device, once, explicitly.

        Called by the entry points (trainer, inference, tests) before megatron-core is used.
        Default: nothing to adapt (CUDA)."""

    def describe(self) -> dict:
        """Machine-readable summary for logs."""
        return {"backend": self.name, "dist_backend": self.dist_backend,
                "device": str(self.device())}


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    """The softmax scale used when none is given: 1 / sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


class _BackendAttention(torch.autograd.Function):
    """Autograd glue: forward keeps (q, k, v, out, lse); backward calls the backend's
    `attention_backward`, so every backend gets a memory-lean differentiable attention."""

    @staticmethod
    def forward(ctx, backend, q, k, v, causal, scale, cu_q, cu_kv, max_q, max_kv):
        out, lse = backend.attention_forward(
            q, k, v, causal=causal, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
            max_seqlen_q=max_q, max_seqlen_kv=max_kv,
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backend = backend
        ctx.args = (causal, scale, cu_q, cu_kv, max_q, max_kv)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, cu_q, cu_kv, max_q, max_kv = ctx.args
        dq, dk, dv = ctx.backend.attention_backward(
            dout.contiguous(), q, k, v, out, lse, causal=causal, scale=scale,
            cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, max_seqlen_q=max_q, max_seqlen_kv=max_kv,
        )
        return None, dq, dk, dv, None, None, None, None, None, None
