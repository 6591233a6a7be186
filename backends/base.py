"""The one seam for hardware: what every backend (cpu, cuda, npu) provides.

Model, trainer and inference code hold a `Backend` and call its methods; they never test the
device type and never import an accelerator package.

Attention conventions shared by every backend (so ring attention and decode can merge blocks):

* Dense input is `[b, s, n, d]` (BSND). `q` has `n_q` heads, `k`/`v` have `n_kv` heads with
  `n_q % n_kv == 0`; query head `h` uses kv head `h // (n_q // n_kv)` (grouped, like
  `repeat_interleave`).
* Every call takes one `AttentionParams` (backends/attention_params.py): the mask kind
  ("none", "causal" = top-left, "causal_bottom_right"), the scale (default `1 / sqrt(d)`) and,
  for packed input, the cumulative lengths.
* Packed variable-length input is `[t, n, d]` (THD) with cumulative lengths WITH a leading 0
  (megatron / flash-attn convention), e.g. lengths [3, 5] -> [0, 3, 8], as int32 device
  tensors and host tuples. Backends that need another convention convert inside. A call makes
  no host-device sync when the params carry the host tuples.
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

from backends.attention_params import AttentionParams


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
    def attention_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          params: AttentionParams) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention output (q's dtype, q's layout) and fp32 log-sum-exp (see module doc)."""

    @abc.abstractmethod
    def attention_backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           params: AttentionParams
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) for the given out/lse; dk/dv summed over each GQA group."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  params: AttentionParams) -> torch.Tensor:
        """Differentiable attention built from `attention_forward` / `attention_backward`."""
        if not isinstance(params, AttentionParams):
            raise TypeError(f"attention takes an AttentionParams, got {type(params).__name__}")
        return _BackendAttention.apply(self, q, k, v, params)

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
    def forward(ctx, backend, q, k, v, params):
        out, lse = backend.attention_forward(q, k, v, params)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backend = backend
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.attention_backward(dout.contiguous(), q, k, v, out, lse,
                                                    ctx.params)
        return None, dq, dk, dv, None
