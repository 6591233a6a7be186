"""CUDA backend: FlashAttention-2 kernels (PyTorch's own, or the flash-attn package), NCCL.

Kernels (backend option `attention_impl`, config `backend_options.attention_impl`; the
wrappers are in `backends.cuda_kernels`):

* "torch": `torch.ops.aten._flash_attention_forward` / `_flash_attention_backward`, PyTorch's
  copy of FlashAttention-2. No extra package needed.
* "flash_attn": flash-attn's private `_flash_attn_[varlen_]forward / _backward`, bound by
  keyword to the installed version (2.6-2.8).
* "auto" (default): flash_attn when it imports and binds, else torch (one warning when it is
  installed but unusable; silent when it is simply not installed).

How the protocol of `backends.base` maps onto the flash kernels:

* No host-device synchronisation per call. Dense `[b, s, n, d]` input calls the kernels' dense
  form (no cumulative lengths; its lse is `[b, n, s_q]`, ours), so nothing is built from host
  values and nothing is reshaped. Packed `[t, n, d]` input takes the params' device
  `cu_seqlens` as they are and reads lengths only from the params' host tuples; params
  without them cost one sync where lengths are needed (a missing max_seqlen, the top-left
  split below).
* Views are not copied: the kernels need only the last dimension contiguous and read the
  other strides, so the ViT's q/k/v (unbind views of one fused qkv), megatron's v (a split
  view) and its transposed `[s, b, n, d]` tensors go in as they are.
* masks: the kernels align the causal mask bottom-right in each sequence (key j is visible to
  query i iff `j <= i + s_kv - s_q`): the mask kind "causal_bottom_right" as is. "causal" is
  top-left (`j <= i`); the two agree when `s_q == s_kv`, the common case, which costs nothing.
  Otherwise a top-left call is split: the first `min(s_q, s_kv)` queries against as many keys
  with the causal mask, and the queries beyond `s_kv` against all keys without a mask (dense:
  two calls on slices, views again; packed: row indices built from the host lengths, copied to
  the device without blocking).
* lse: fp32; varlen `[n, total_q]` from current kernels (PyTorch 2.13, flash-attn >= 2.6), padded
  `[b, n, max_q]` from older PyTorch builds (read off the forward output, probed once with a
  tiny call if a backward comes first, converted both ways). A row that sees no key gets lse
  +inf from the kernel (its backward weight exp(S - lse) is then 0) where ours is -inf: mapped.
* GQA is native (query head h uses kv head h // (n_q // n_kv); dk/dv summed per group). The
  kernels' decode path for GQA (`max_seqlen_q == 1`: query heads folded into the sequence axis)
  assumes one query per sequence; with an empty query segment `max_seqlen_q` is passed as 2,
  which only turns that path off.
* Deterministic mode (`torch.use_deterministic_algorithms`) reaches both kernels' backward.

dtypes: the kernels run in fp16 / bf16. q/k/v of mixed dtypes (e.g. fp32 q/k after RoPE with
fp32 cos/sin, bf16 v) are cast to their half-precision dtype (one warning names the cast); the
output and gradients come back in each input's dtype. All-fp32 inputs, head_dim > 256 or not
a multiple of 8,
different q/k/v head dims, or GPUs older than sm80 use the reference math, exact but with
O(s^2) fp32 scores, with one warning per reason - and only up to `reference_max_score_bytes`
of scores per call: above that the call raises and says what to change.

Fused layers (`backends.cuda_fused`): torch's fused rms_norm; RoPE and SwiGLU compiled.
"""
from __future__ import annotations

import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Set, Tuple

import torch

from backends import reference
from backends.attention_params import AttentionParams, lengths_from_cu
from backends.base import Backend, BackendUnavailableError, default_scale
from backends.cuda_fused import CUDAFusedLayers
from backends.cuda_kernels import FlashAttnKernels, FlashAttnSignatureError, TorchFlashKernels

#: values of the backend option `attention_impl`
ATTENTION_IMPLS = ("auto", "torch", "flash_attn")
#: dtypes the flash kernels take
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_INSTALL_FLASH_ATTN = ("pip install flash-attn --no-build-isolation (it compiles against the "
                       "installed torch), or set backend_options.attention_impl=torch")
# kept importable from here: tests and the GPU audit use these names
_TorchFlashKernels, _FlashAttnKernels = TorchFlashKernels, FlashAttnKernels
__all__ = ["ATTENTION_IMPLS", "CUDABackend", "FlashAttnSignatureError"]


# ----------------------------------------------------------------------------- fallback decision
def _device_reason(device: torch.device) -> Optional[str]:
    """None when the flash kernels run on `device`, else why not."""
    if device.type != "cuda":
        return f"tensors on {device.type} (the flash kernels run on CUDA devices)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"GPU compute capability {major}.{minor} (the flash kernels need 8.0+, Ampere "
                "or newer)")
    return None


def _shape_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when the flash kernels take q/k/v's head layout, else why not."""
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return (f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]} (the flash kernels need "
                "them equal)")
    if d > _MAX_HEAD_DIM or d % 8:
        return f"head_dim {d} (the flash kernels take multiples of 8 up to {_MAX_HEAD_DIM})"
    if k.shape[-2] != v.shape[-2] or q.shape[-2] % k.shape[-2]:
        return f"{q.shape[-2]} query heads for {k.shape[-2]} key / {v.shape[-2]} value heads"
    return None


def _kernel_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the flash kernels run in for q/k/v: theirs when they agree on one the kernels
    take; else the first such dtype among them (q, k after RoPE with fp32 cos/sin are fp32
    while v kept the activations' dtype); None when all are fp32 (the reference math). Only
    the dtypes decide - not autocast, which is off in the backward pass - so a forward and its
    backward always take the same path."""
    for t in (q, k, v):
        if t.dtype in _FLASH_DTYPES:
            return t.dtype
    return None


def _flash_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when the flash kernels can run (q, k, v) (after a cast, see `_kernel_dtype`), else
    the reason (used in the warning)."""
    if _kernel_dtype(q, k, v) is None:
        return f"dtype {q.dtype} (the flash kernels take float16 / bfloat16)"
    return _shape_reason(q, k, v) or _device_reason(q.device)


def _flash_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the flash kernels can take (q, k, v)."""
    return _flash_unsupported_reason(q, k, v) is None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x as it is when the kernels can read it (stride(-1) == 1), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _reference_score_bytes(q: torch.Tensor, k: torch.Tensor, params: AttentionParams) -> int:
    """fp32 bytes of one score matrix of the reference math for this call (it loops over packed
    sequences, so the longest one counts), from shapes and host values only."""
    if not params.is_packed:
        return q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] * 4
    max_q = params.max_seqlen_q if params.max_seqlen_q is not None else q.shape[0]
    max_kv = params.max_seqlen_kv if params.max_seqlen_kv is not None else k.shape[0]
    return q.shape[1] * max_q * max_kv * 4


# ------------------------------------------------------------------ lengths and packing (THD)
def _host_lengths(cu_seqlens: torch.Tensor, name: str) -> List[int]:
    """Per-sequence lengths from a cumulative-lengths TENSOR (a device sync; only for params
    that carry no host tuple)."""
    values = [int(x) for x in cu_seqlens.tolist()]
    if len(values) < 2:
        raise ValueError(f"{name} must hold at least one sequence (megatron convention), "
                         f"got {values}")
    try:
        return list(lengths_from_cu(values))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _host_to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, without blocking the host."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _cumulative(lengths: Sequence[int], device) -> torch.Tensor:
    """int32 cumulative lengths with a leading 0 (the kernels' `cu_seqlens`)."""
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + int(length))
    return _host_to_device(torch.tensor(cu, dtype=torch.int32), device)


class _Varlen(NamedTuple):
    """Packed attention input with its kernel arguments."""

    q: torch.Tensor  # [t_q, n_q, d]
    k: torch.Tensor  # [t_kv, n_kv, d]
    v: torch.Tensor  # [t_kv, n_kv, d]
    cu_q: torch.Tensor  # int32 [b + 1], leading 0, on q's device
    cu_kv: torch.Tensor
    max_q: int
    max_kv: int
    lengths_q: Optional[List[int]]  # host copies, where known without an extra sync
    lengths_kv: Optional[List[int]]


def _to_varlen(q, k, v, params: AttentionParams) -> _Varlen:
    """Packed [t, n, d] input with the params' cu_seqlens as int32 on q's device (the given
    tensors when they are there already). Lengths come from the params' host tuples (no sync);
    params with tensors only are read (one device sync) when lengths are needed: a missing
    max_seqlen, or top-left causal attention with distinct q / kv cumulative lengths (the
    top-left split needs them)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"packed attention expects [t, n, d] q/k/v, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    same = cu_kv is None or cu_kv is cu_q
    cu_q_dev, cu_kv_dev = params.device_cu_seqlens(q.device)
    lq = lk = None
    max_q, max_kv = params.max_seqlen_q, params.max_seqlen_kv
    if params.cu_seqlens_q_host is not None:
        lq, lk = list(params.seqlens_q()), list(params.seqlens_kv())
    elif (params.mask == "causal" and not same) or max_q is None or max_kv is None:
        lq = _host_lengths(cu_q, "cu_seqlens_q")
        lk = lq if same else _host_lengths(cu_kv, "cu_seqlens_kv")
    if lq is not None and len(lq) != len(lk):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_kv describe {len(lq)} and {len(lk)} "
                         "sequences; they must describe the same sequences")
    max_q = max(lq, default=0) if max_q is None else int(max_q)
    max_kv = max(lk, default=0) if max_kv is None else int(max_kv)
    return _Varlen(q, k, v, cu_q_dev, cu_kv_dev, max_q, max_kv, lq, lk)


class _Piece(NamedTuple):
    """One kernel call of a split top-left causal attention over packed input."""

    q_rows: torch.Tensor  # int64 rows of the packed q (and out, lse, dout) this call covers
    kv_rows: torch.Tensor  # int64 rows of the packed k / v
    cu_q: torch.Tensor
    cu_kv: torch.Tensor
    max_q: int
    max_kv: int
    causal: bool


def _rows(starts: Sequence[int], lengths: Sequence[int], device) -> torch.Tensor:
    """Row indices [starts[0], starts[0] + lengths[0]) ++ [starts[1], ...) ... as int64, built
    on the host (from host lengths) and copied to `device` without blocking."""
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    total = sum(int(n) for n in lengths)
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t, output_size=total)
    first = torch.cumsum(lengths_t, 0) - lengths_t  # each segment's offset in the result
    rows = torch.tensor(starts, dtype=torch.int64)[segment] + torch.arange(total) - first[segment]
    return _host_to_device(rows, device)


def _piece(q_starts, q_lengths, kv_starts, kv_lengths, causal, device) -> _Piece:
    return _Piece(_rows(q_starts, q_lengths, device), _rows(kv_starts, kv_lengths, device),
                  _cumulative(q_lengths, device), _cumulative(kv_lengths, device),
                  max(q_lengths), max(kv_lengths), causal)


def _top_left_causal_pieces(lengths_q: Sequence[int], lengths_kv: Sequence[int],
                            device) -> List[_Piece]:
    """Top-left causal attention over sequences with s_q != s_kv, as flash kernel calls.

    Per sequence with m = min(s_q, s_kv): queries [0, m) against keys [0, m) with the kernel's
    causal mask (square, so bottom-right = top-left); when s_q > s_kv, queries [s_kv, s_q)
    against all s_kv keys without a mask (top-left, every key j < s_kv <= i is visible). Keys
    [m, s_kv) of a sequence with s_q < s_kv are seen by no query. Queries of a sequence without
    keys are in no piece: the caller leaves them at output 0, lse -inf, gradient 0.
    """
    q_start = k_start = 0
    square: Tuple[list, list, list] = ([], [], [])  # q starts, kv starts, lengths
    beyond: Tuple[list, list, list, list] = ([], [], [], [])  # q starts, q lens, kv starts, kv lens
    for s_q, s_kv in zip(lengths_q, lengths_kv):
        m = min(s_q, s_kv)
        if m:
            square[0].append(q_start)
            square[1].append(k_start)
            square[2].append(m)
            if s_q > s_kv:
                beyond[0].append(q_start + s_kv)
                beyond[1].append(s_q - s_kv)
                beyond[2].append(k_start)
                beyond[3].append(s_kv)
        q_start += s_q
        k_start += s_kv
    pieces = []
    if square[2]:
        pieces.append(_piece(square[0], square[2], square[1], square[2], True, device))
    if beyond[1]:
        pieces.append(_piece(beyond[0], beyond[1], beyond[2], beyond[3], False, device))
    return pieces


def _dense_top_left_pieces(s_q: int, s_kv: int) -> List[Tuple[slice, slice, bool]]:
    """Dense top-left causal attention with s_q != s_kv as (query rows, keys, kernel causal)
    slices: the square [0, m) causal, and rows [s_kv, s_q) against every key (also when there
    are none: that call gives rows without keys)."""
    m = min(s_q, s_kv)
    pieces = [(slice(0, m), slice(0, m), True)] if m else []
    if s_q > s_kv:
        pieces.append((slice(s_kv, s_q), slice(0, s_kv), False))
    return pieces


# ------------------------------------------------------------------------------ lse layouts
def _token_positions(cu_q: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position in it) of every packed query row, computed on the device."""
    cu = cu_q.to(torch.int64)
    token = torch.arange(total, device=cu.device)
    sequence = torch.searchsorted(cu[1:].contiguous(), token, right=True)
    return sequence, token - cu[sequence]


def _lse_padded_to_packed(lse: torch.Tensor, cu_q: torch.Tensor, total: int) -> torch.Tensor:
    """Older kernels' padded [b, n, max_q] lse -> [n, total]."""
    sequence, position = _token_positions(cu_q, total)
    return lse[sequence, :, position].transpose(0, 1).contiguous()


def _lse_packed_to_padded(lse: torch.Tensor, cu_q: torch.Tensor, max_q: int) -> torch.Tensor:
    """[n, total] lse -> the padded [b, n, max_q] layout older kernels' backward reads.
    Padding rows hold +inf (rows without keys, weight 0); the kernel does not read them."""
    sequence, position = _token_positions(cu_q, lse.shape[1])
    padded = lse.new_full((cu_q.numel() - 1, lse.shape[0], max_q), math.inf)
    padded[sequence, :, position] = lse.transpose(0, 1)
    return padded


def _lse_from_kernel(lse: torch.Tensor) -> torch.Tensor:
    """Kernel lse (fp32) -> ours: rows without keys are +inf there, -inf here."""
    return lse.masked_fill(lse == math.inf, -math.inf)


def _lse_for_kernel(lse: torch.Tensor) -> torch.Tensor:
    """Our lse -> the kernel's: contiguous fp32, rows without keys at +inf (weight 0)."""
    lse = lse.float()
    return lse.masked_fill(lse == -math.inf, math.inf).contiguous()


# ---------------------------------------------------------------------------------- backend
class CUDABackend(CUDAFusedLayers, Backend):
    """NVIDIA GPUs: FlashAttention-2 kernels, NCCL collectives."""

    name = "cuda"
    dist_backend = "nccl"
    option_names = ("attention_impl",)
    #: the reference math (inputs the kernels cannot take) refuses calls whose fp32 score
    #: matrix would exceed this; it holds a few of them at once
    reference_max_score_bytes = 1 << 30

    def __init__(self, attention_impl: str = "auto") -> None:
        """`attention_impl`: "auto" | "torch" | "flash_attn" (see the module doc)."""
        if attention_impl not in ATTENTION_IMPLS:
            raise BackendUnavailableError(
                f"backend_options.attention_impl={attention_impl!r}: choose one of "
                f"{', '.join(ATTENTION_IMPLS)}")
        self.attention_impl = attention_impl
        #: where the torch kernels are looked up (tests put CPU fakes here)
        self._aten = torch.ops.aten
        self._kernels_cache = None
        self._warned: Set[str] = set()

    @classmethod
    def probe(cls) -> Optional[str]:
        if not torch.cuda.is_available():
            reason = ("this torch build has no CUDA support" if torch.version.cuda is None
                      else "no NVIDIA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            return (f"backend 'cuda' cannot run: {reason}; install a CUDA build of torch on a GPU "
                    "host, or choose MINDSPEED_VITA_BACKEND=cpu")
        return None

    def device(self, local_rank: Optional[int] = None) -> torch.device:
        index = torch.cuda.current_device() if local_rank is None else int(local_rank)
        return torch.device("cuda", index)

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

    def describe(self) -> dict:
        info = super().describe()
        info["attention_kernels"] = self._kernels().name
        return info

    # ---------------------------------------------------------------- kernels
    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def _kernels(self):
        """The flash kernels `attention_impl` selects, resolved on first use."""
        if self._kernels_cache is None:
            self._kernels_cache = self._resolve_kernels()
        return self._kernels_cache

    def _resolve_kernels(self):
        if self.attention_impl == "torch":
            return TorchFlashKernels(self._aten)
        try:
            return FlashAttnKernels.load()
        except ModuleNotFoundError as exc:
            if exc.name != "flash_attn":
                problem = f"flash-attn is installed but does not import ({exc})"
            elif self.attention_impl == "flash_attn":
                raise BackendUnavailableError(
                    f"backend_options.attention_impl=flash_attn but flash-attn is not installed; "
                    f"{_INSTALL_FLASH_ATTN}") from exc
            else:
                return TorchFlashKernels(self._aten)  # optional package, simply absent
        except (ImportError, OSError, RuntimeError) as exc:
            # FlashAttnSignatureError, or a build that does not match this torch (undefined symbol)
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else type(exc).__name__
            problem = (first_line if isinstance(exc, FlashAttnSignatureError)
                       else f"flash-attn is installed but does not import ({first_line})")
        if self.attention_impl == "flash_attn":
            raise BackendUnavailableError(f"backend_options.attention_impl=flash_attn: {problem}; "
                                          f"{_INSTALL_FLASH_ATTN}")
        self._warn_once(f"cuda backend: {problem}; using PyTorch's own flash kernels")
        return TorchFlashKernels(self._aten)

    def _lse_padded(self, kernels, like: torch.Tensor) -> bool:
        """Whether `kernels` use the padded varlen lse layout; one tiny forward call (once per
        process) if not yet seen."""
        if kernels.lse_padded is None:
            x = torch.zeros(3, 1, 8, dtype=like.dtype, device=like.device)
            cu = _cumulative([1, 2], like.device)
            lse = kernels.forward(x, x, x, cu, cu, 2, 2, False, 1.0)[1]
            kernels.lse_padded = lse.dim() == 3
        return kernels.lse_padded

    # ------------------------------------------------------------ dense calls
    @staticmethod
    def _dense_call(kernels, q, k, v, causal, scale):
        """One dense kernel call -> (out [b, s_q, n, d], lse [b, n, s_q] in our convention)."""
        b, s_q, n = q.shape[:3]
        if b == 0 or s_q == 0 or k.shape[1] == 0:
            # nothing to compute, or no key at all: output 0, lse -inf (no kernel call)
            return (q.new_zeros(q.shape[:-1] + v.shape[-1:]),
                    q.new_full((b, n, s_q), -math.inf, dtype=torch.float32))
        out, lse = kernels.dense_forward(_last_dim_contiguous(q), _last_dim_contiguous(k),
                                         _last_dim_contiguous(v), causal, scale)
        return out, _lse_from_kernel(lse)

    @staticmethod
    def _dense_backward_call(kernels, dout, q, k, v, out, lse, causal, scale):
        """One dense kernel call for the given out and lse ([b, n, s_q], ours)."""
        if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        return kernels.dense_backward(
            _last_dim_contiguous(dout.to(q.dtype)), _last_dim_contiguous(q),
            _last_dim_contiguous(k), _last_dim_contiguous(v),
            _last_dim_contiguous(out.to(q.dtype)), _lse_for_kernel(lse), causal, scale)

    def _dense_forward(self, kernels, q, k, v, mask: str, scale: float):
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"dense attention expects [b, s, n, d] q/k/v, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        s_q, s_kv = q.shape[1], k.shape[1]
        if mask != "causal" or s_q == s_kv:
            return self._dense_call(kernels, q, k, v, mask != "none", scale)
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty((q.shape[0], q.shape[2], s_q), dtype=torch.float32)
        for rows, keys, causal in _dense_top_left_pieces(s_q, s_kv):
            o, l = self._dense_call(kernels, q[:, rows], k[:, keys], v[:, keys], causal, scale)
            out[:, rows] = o
            lse[:, :, rows] = l
        return out, lse

    def _dense_backward(self, kernels, dout, q, k, v, out, lse, mask: str, scale: float):
        s_q, s_kv = q.shape[1], k.shape[1]
        if mask != "causal" or s_q == s_kv:
            return self._dense_backward_call(kernels, dout, q, k, v, out, lse, mask != "none",
                                             scale)
        dq = q.new_empty(q.shape)
        # both pieces see the same keys when s_q > s_kv: accumulate their dk / dv in fp32
        dk = k.new_zeros(k.shape, dtype=torch.float32)
        dv = v.new_zeros(v.shape, dtype=torch.float32)
        for rows, keys, causal in _dense_top_left_pieces(s_q, s_kv):
            g_q, g_k, g_v = self._dense_backward_call(
                kernels, dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows],
                lse[:, :, rows], causal, scale)
            dq[:, rows] = g_q
            dk[:, keys] += g_k.float()
            dv[:, keys] += g_v.float()
        return dq, dk.to(k.dtype), dv.to(v.dtype)

    # ----------------------------------------------------------- packed calls
    def _kernel_forward(self, kernels, q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """One varlen kernel call -> (out [t, n, d], lse [n, t] in our convention)."""
        t_q, n = q.shape[0], q.shape[1]
        if t_q == 0 or k.shape[0] == 0:
            # nothing to compute, or no key at all: output 0, lse -inf (no kernel call)
            return (q.new_zeros((t_q, n, v.shape[-1])),
                    q.new_full((n, t_q), -math.inf, dtype=torch.float32))
        if max_q == 1 and n > k.shape[1] and t_q != cu_q.shape[0] - 1:
            # the GQA decode path (max_seqlen_q == 1) reshapes q to [batch, n_kv, group, d]
            # and fails when a sequence has no query; an upper bound of 2 turns it off
            max_q = 2
        out, lse = kernels.forward(_last_dim_contiguous(q), _last_dim_contiguous(k),
                                   _last_dim_contiguous(v), cu_q, cu_kv, max_q, max_kv, causal,
                                   scale)
        kernels.lse_padded = lse.dim() == 3
        if kernels.lse_padded:
            lse = _lse_padded_to_packed(lse, cu_q, t_q)
        return out, _lse_from_kernel(lse)

    def _kernel_backward(self, kernels, dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv,
                         causal, scale):
        """One varlen kernel call for the given out and lse ([n, t], ours)."""
        if q.shape[0] == 0 or k.shape[0] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        lse = _lse_for_kernel(lse)
        if self._lse_padded(kernels, q):
            lse = _lse_packed_to_padded(lse, cu_q, max_q)
        return kernels.backward(
            _last_dim_contiguous(dout.to(q.dtype)), _last_dim_contiguous(q),
            _last_dim_contiguous(k), _last_dim_contiguous(v),
            _last_dim_contiguous(out.to(q.dtype)), lse, cu_q, cu_kv, max_q, max_kv, causal,
            scale)

    @staticmethod
    def _needs_split(p: _Varlen, mask: str) -> bool:
        # the kernels' causal is bottom-right; top-left equals it only where s_q == s_kv
        return mask == "causal" and p.lengths_q is not None and p.lengths_q != p.lengths_kv

    def _varlen_forward(self, kernels, p: _Varlen, mask: str, scale: float):
        if not self._needs_split(p, mask):
            return self._kernel_forward(kernels, p.q, p.k, p.v, p.cu_q, p.cu_kv, p.max_q,
                                        p.max_kv, mask != "none", scale)
        t_q, n = p.q.shape[0], p.q.shape[1]
        out = p.q.new_zeros((t_q, n, p.v.shape[-1]))
        lse = p.q.new_full((n, t_q), -math.inf, dtype=torch.float32)
        for piece in _top_left_causal_pieces(p.lengths_q, p.lengths_kv, p.q.device):
            o, l = self._kernel_forward(kernels, p.q[piece.q_rows], p.k[piece.kv_rows],
                                        p.v[piece.kv_rows], piece.cu_q, piece.cu_kv, piece.max_q,
                                        piece.max_kv, piece.causal, scale)
            out[piece.q_rows] = o
            lse[:, piece.q_rows] = l
        return out, lse

    def _varlen_backward(self, kernels, p: _Varlen, dout, out, lse, mask: str, scale: float):
        if not self._needs_split(p, mask):
            return self._kernel_backward(kernels, dout, p.q, p.k, p.v, out, lse, p.cu_q, p.cu_kv,
                                         p.max_q, p.max_kv, mask != "none", scale)
        dq = torch.zeros_like(p.q)
        # pieces share keys (s_q > s_kv): accumulate their dk / dv in fp32
        dk = torch.zeros(p.k.shape, dtype=torch.float32, device=p.k.device)
        dv = torch.zeros(p.v.shape, dtype=torch.float32, device=p.v.device)
        for piece in _top_left_causal_pieces(p.lengths_q, p.lengths_kv, p.q.device):
            rows, keys = piece.q_rows, piece.kv_rows
            g_q, g_k, g_v = self._kernel_backward(
                kernels, dout[rows], p.q[rows], p.k[keys], p.v[keys], out[rows], lse[:, rows],
                piece.cu_q, piece.cu_kv, piece.max_q, piece.max_kv, piece.causal, scale)
            dq[rows] = g_q
            # index_put_ with accumulate has a deterministic CUDA path (index_add_ may not)
            dk.index_put_((keys,), g_k.float(), accumulate=True)
            dv.index_put_((keys,), g_v.float(), accumulate=True)
        return dq, dk.to(p.k.dtype), dv.to(p.v.dtype)

    # ---------------------------------------------------------------- attention
    def _kernel_dtype_or_reference(self, q, k, v, params) -> Optional[torch.dtype]:
        """The dtype to run the kernels in, or None for the reference math (one warning per
        reason; a clear error above `reference_max_score_bytes`)."""
        reason = _flash_unsupported_reason(q, k, v)
        if reason is None:
            dtype = _kernel_dtype(q, k, v)
            if any(t.dtype != dtype for t in (q, k, v)):
                self._warn_once(
                    f"cuda backend: q/k/v in {q.dtype}/{k.dtype}/{v.dtype}: the flash kernels run "
                    f"in {dtype} (inputs cast per call; keep them in one dtype to avoid the "
                    "copies)")
            return dtype
        need = _reference_score_bytes(q, k, params)
        if need > self.reference_max_score_bytes:
            raise ValueError(
                f"cuda backend: the flash kernels cannot take {reason}, and the reference "
                f"attention would materialise {need / 2**30:.2f} GiB of fp32 scores per call "
                f"(limit {self.reference_max_score_bytes / 2**30:.2f} GiB): run attention in "
                "bf16/fp16 (or under torch.autocast) with a supported head layout")
        self._warn_once(f"cuda backend: the flash kernels cannot take {reason}; using the "
                        "reference attention (exact, memory O(s^2))")
        return None

    def attention_forward(self, q, k, v, params: AttentionParams
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        dtype = self._kernel_dtype_or_reference(q, k, v, params)
        if dtype is None:
            return reference.attention_reference(q, k, v, params)
        scale = default_scale(q.shape[-1], params.scale)
        kernels = self._kernels()
        qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
        if params.is_packed:
            out, lse = self._varlen_forward(kernels, _to_varlen(qc, kc, vc, params), params.mask,
                                            scale)
        else:
            out, lse = self._dense_forward(kernels, qc, kc, vc, params.mask, scale)
        return out.to(q.dtype), lse

    def attention_backward(self, dout, q, k, v, out, lse, params: AttentionParams):
        dtype = self._kernel_dtype_or_reference(q, k, v, params)
        if dtype is None:
            return reference.attention_backward_reference(dout, q, k, v, out, lse, params)
        scale = default_scale(q.shape[-1], params.scale)
        kernels = self._kernels()
        qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
        dout, out = dout.to(dtype), out.to(dtype)
        if params.is_packed:
            grads = self._varlen_backward(kernels, _to_varlen(qc, kc, vc, params), dout, out,
                                          lse, params.mask, scale)
        else:
            grads = self._dense_backward(kernels, dout, qc, kc, vc, out, lse, params.mask, scale)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
