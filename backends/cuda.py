"""CUDA backend: FlashAttention-2 kernels (PyTorch's own, or the flash-attn package), NCCL.

Kernels (backend option `attention_impl`, config `backend_options.attention_impl`):

* "torch": `torch.ops.aten._flash_attention_forward` / `_flash_attention_backward`, PyTorch's
  copy of FlashAttention-2. No extra package needed.
* "flash_attn": `flash_attn.flash_attn_interface._flash_attn_varlen_forward` / `_backward`
  (extra `[gpu]`). These are private and their signatures changed between releases (2.6:
  `window_size=(l, r)`, 8 return values; 2.7/2.8: `window_size_left/right`, custom ops with 4
  return values), so they are bound by keyword after reading their signatures; a signature
  this file does not know is a clear error naming the parameter.
* "auto" (default): flash_attn when it imports and binds, else torch (one warning when it is
  installed but unusable; silent when it is simply not installed).

How the protocol of `backends.base` maps onto the flash kernels:

* Both kernels are called in their varlen (THD) form, the only one whose backward takes
  cumulative lengths from Python: dense `[b, s, n, d]` becomes `[b * s, n, d]` with uniform
  `cu_seqlens`. Our `cu_seqlens` (int32, leading 0) are exactly the kernels' convention.
* masks: the flash kernels align the causal mask bottom-right in each sequence (key j is
  visible to query i iff `j <= i + s_kv - s_q`): that is the mask kind "causal_bottom_right"
  as is. "causal" is top-left (`j <= i`); the two agree when `s_q == s_kv`, the common case,
  which costs nothing extra. Otherwise a top-left call is split (see
  `_top_left_causal_pieces`): the first `min(s_q, s_kv)` queries against as many keys with the
  causal mask, and the queries beyond `s_kv` against all keys without a mask.
* lse: fp32 `[n, total_q]` from current kernels (PyTorch 2.13, flash-attn >= 2.6); older
  PyTorch builds return it padded `[b, n, max_q]`. The layout is read off the forward output
  (probed once with a tiny call if a backward comes first) and converted both ways. A query
  row that sees no key gets lse = +inf from the kernel (so that its backward weight
  exp(S - lse) is 0) where our protocol says -inf: mapped both ways.
* GQA is native (query head h uses kv head h // (n_q // n_kv); dk/dv summed per group).
* Dropout is off, so the philox seed/offset the backward takes are placeholders it never reads;
  windows are left unlimited.

Inputs the flash kernels cannot take (fp32, head_dim > 256 or not a multiple of 8, different
q/k/v head dims, GPUs older than sm80) use the reference math, exact but O(s^2) in memory,
with one warning per reason. Fused layers are the reference torch ops; numerics match the CPU
reference.
"""
from __future__ import annotations

import importlib
import inspect
import math
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch

from backends import reference
from backends.attention_params import AttentionParams, lengths_from_cu
from backends.base import Backend, BackendUnavailableError, default_scale

#: values of the backend option `attention_impl`
ATTENTION_IMPLS = ("auto", "torch", "flash_attn")
#: dtypes the flash kernels take
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_INSTALL_FLASH_ATTN = ("pip install 'mindspeed-vita[gpu]' (flash-attn >= 2.6, built for this "
                       "torch), or set backend_options.attention_impl=torch")


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


def _flash_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None when the flash kernels can take (q, k, v), else the reason (used in the warning)."""
    if q.dtype not in _FLASH_DTYPES:
        return f"dtype {q.dtype} (the flash kernels take float16 / bfloat16)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return (f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]} (the flash kernels need "
                "them equal)")
    if d > _MAX_HEAD_DIM or d % 8:
        return f"head_dim {d} (the flash kernels take multiples of 8 up to {_MAX_HEAD_DIM})"
    if k.shape[-2] != v.shape[-2] or q.shape[-2] % k.shape[-2]:
        return f"{q.shape[-2]} query heads for {k.shape[-2]} key / {v.shape[-2]} value heads"
    return _device_reason(q.device)


def _flash_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the flash kernels can take (q, k, v)."""
    return _flash_unsupported_reason(q, k, v) is None


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


def _cumulative(lengths: Sequence[int], device) -> torch.Tensor:
    """int32 cumulative lengths with a leading 0 (the kernels' `cu_seqlens`)."""
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + int(length))
    return torch.tensor(cu, dtype=torch.int32, device=device)


class _Varlen(NamedTuple):
    """Attention input in the kernels' packed form."""

    q: torch.Tensor  # [t_q, n_q, d]
    k: torch.Tensor  # [t_kv, n_kv, d]
    v: torch.Tensor  # [t_kv, n_kv, d]
    cu_q: torch.Tensor  # int32 [b + 1], leading 0, on q's device
    cu_kv: torch.Tensor
    max_q: int
    max_kv: int
    lengths_q: Optional[List[int]]  # host copies, where known without an extra sync
    lengths_kv: Optional[List[int]]
    dense: Optional[Tuple[int, int]]  # (b, s_q) when the input was dense [b, s, n, d]


def _to_varlen(q, k, v, params: AttentionParams) -> _Varlen:
    """Dense [b, s, n, d] -> packed [b * s, n, d] with uniform lengths; packed input as given,
    with cu_seqlens as int32 on q's device. Lengths come from the params' host tuples (no
    sync). Params with tensors only are read (one device sync) when the lengths are needed: a
    missing max_seqlen, or top-left causal attention with distinct q / kv cumulative lengths
    (the top-left split needs them)."""
    if not params.is_packed:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"dense attention expects [b, s, n, d] q/k/v, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        b, s_q, s_kv = q.shape[0], q.shape[1], k.shape[1]
        lq, lk = [s_q] * b, [s_kv] * b
        return _Varlen(q.reshape(b * s_q, *q.shape[2:]), k.reshape(b * s_kv, *k.shape[2:]),
                       v.reshape(b * s_kv, *v.shape[2:]), _cumulative(lq, q.device),
                       _cumulative(lk, q.device), s_q, s_kv, lq, lk, (b, s_q))
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
    return _Varlen(q, k, v, cu_q_dev, cu_kv_dev, max_q, max_kv, lq, lk, None)


class _Piece(NamedTuple):
    """One kernel call of a split top-left causal attention."""

    q_rows: torch.Tensor  # int64 rows of the packed q (and out, lse, dout) this call covers
    kv_rows: torch.Tensor  # int64 rows of the packed k / v
    cu_q: torch.Tensor
    cu_kv: torch.Tensor
    max_q: int
    max_kv: int
    causal: bool


def _rows(starts: Sequence[int], lengths: Sequence[int], device) -> torch.Tensor:
    """Row indices [starts[0], starts[0] + lengths[0]) ++ [starts[1], ...) ... as int64."""
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    total = int(lengths_t.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t, output_size=total)
    first = torch.cumsum(lengths_t, 0) - lengths_t  # each segment's offset in the result
    rows = torch.tensor(starts, dtype=torch.int64)[segment] + torch.arange(total) - first[segment]
    return rows.to(device)


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
    """Kernel lse ([n, t] fp32) -> ours: rows without keys are +inf there, -inf here."""
    return lse.masked_fill(lse == math.inf, -math.inf)


def _lse_for_kernel(lse: torch.Tensor) -> torch.Tensor:
    """Our lse -> the kernel's: contiguous fp32, rows without keys at +inf (weight 0)."""
    lse = lse.float()
    return lse.masked_fill(lse == -math.inf, math.inf).contiguous()


# ---------------------------------------------------------------------------------- kernels
class _TorchFlashKernels:
    """PyTorch's FlashAttention-2 ops (schema of PyTorch 2.13):

    `_flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
    is_causal, return_debug_mask, *, scale, window_size_left, window_size_right, seqused_k,
    alibi_slopes, block_table, num_splits) -> (output, softmax_logsumexp, rng_state, unused,
    debug_attn_mask)` and `_flash_attention_backward(grad_out, query, key, value, out,
    logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state, unused, *,
    scale, window_size_left, window_size_right) -> (dq, dk, dv)`.
    """

    name = "torch"

    def __init__(self, aten) -> None:
        self._aten = aten
        #: True when the kernel's lse is padded [b, n, max_q]; None until seen
        self.lse_padded: Optional[bool] = None

    def forward(self, q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """(out [t, n, d], lse in the kernel's layout)."""
        result = self._aten._flash_attention_forward(q, k, v, cu_q, cu_kv, max_q, max_kv, 0.0,
                                                     causal, False, scale=scale)
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """(dq, dk, dv) for the given out and lse (kernel layout)."""
        # With dropout_p = 0 the kernel never reads the philox state; these placeholders have
        # the forward's dtypes (torch.nn.attention.varlen passes the same).
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = self._aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, 0.0, causal, rng_state, unused,
            scale=scale)
        return dq, dk, dv


class FlashAttnSignatureError(RuntimeError):
    """The installed flash-attn's private varlen functions have a signature we do not know."""


_FWD_CORE = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
             "dropout_p", "softmax_scale", "causal")
_BWD_CORE = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "cu_seqlens_q",
             "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale", "causal")
#: the other parameters of flash-attn 2.6-2.8 we know, with the value that means "off"
_FWD_EXTRA = {"window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
              "softcap": 0.0, "alibi_slopes": None, "return_softmax": False, "block_table": None,
              "leftpad_k": None, "seqused_k": None, "zero_tensors": False}
_BWD_EXTRA = {"window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
              "softcap": 0.0, "alibi_slopes": None, "deterministic": False, "rng_state": None,
              "zero_tensors": False}


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


class _FlashAttnKernels:
    """flash-attn's private varlen functions, bound by keyword to the installed version."""

    name = "flash_attn"

    def __init__(self, interface, version: str) -> None:
        self.version = version
        self._forward = interface._flash_attn_varlen_forward
        self._backward = interface._flash_attn_varlen_backward
        self._forward_fixed = _fixed_keywords(self._forward, "_flash_attn_varlen_forward",
                                              _FWD_CORE, _FWD_EXTRA, version)
        self._backward_fixed = _fixed_keywords(self._backward, "_flash_attn_varlen_backward",
                                               _BWD_CORE, _BWD_EXTRA, version)
        self.lse_padded: Optional[bool] = None

    @classmethod
    def load(cls) -> "_FlashAttnKernels":
        """Import flash_attn and bind it; ImportError / FlashAttnSignatureError when it cannot."""
        package = importlib.import_module("flash_attn")
        interface = importlib.import_module("flash_attn.flash_attn_interface")
        try:
            return cls(interface, str(getattr(package, "__version__", "unknown")))
        except AttributeError as exc:  # a private function is gone
            raise FlashAttnSignatureError(
                f"flash-attn {getattr(package, '__version__', 'unknown')}: {exc}; this backend "
                "binds the 2.6-2.8 varlen functions") from exc

    def forward(self, q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """(out [t, n, d], lse in the kernel's layout)."""
        result = self._forward(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_kv,
                               max_seqlen_q=max_q, max_seqlen_k=max_kv, dropout_p=0.0,
                               softmax_scale=scale, causal=causal, **self._forward_fixed)
        # 2.6: (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state);
        # 2.7+: (out_padded, softmax_lse, S_dmask, rng_state). head_dim % 8 == 0: no padding.
        if len(result) == 8:
            return result[0], result[5]
        if len(result) == 4:
            return result[0], result[1]
        raise FlashAttnSignatureError(
            f"flash-attn {self.version}: _flash_attn_varlen_forward returned {len(result)} values, "
            "expected 8 (2.6) or 4 (2.7+)")

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """(dq, dk, dv): the function writes into the buffers it is given (every version)."""
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._backward(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
                       cu_seqlens_q=cu_q, cu_seqlens_k=cu_kv, max_seqlen_q=max_q,
                       max_seqlen_k=max_kv, dropout_p=0.0, softmax_scale=scale, causal=causal,
                       **self._backward_fixed)
        return dq, dk, dv


# ---------------------------------------------------------------------------------- backend
class CUDABackend(reference.ReferenceFusedLayers, Backend):
    """NVIDIA GPUs: FlashAttention-2 kernels, NCCL collectives."""

    name = "cuda"
    dist_backend = "nccl"
    option_names = ("attention_impl",)

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
            return _TorchFlashKernels(self._aten)
        try:
            return _FlashAttnKernels.load()
        except ModuleNotFoundError as exc:
            if exc.name != "flash_attn":
                problem = f"flash-attn is installed but does not import ({exc})"
            elif self.attention_impl == "flash_attn":
                raise BackendUnavailableError(
                    f"backend_options.attention_impl=flash_attn but flash-attn is not installed; "
                    f"{_INSTALL_FLASH_ATTN}") from exc
            else:
                return _TorchFlashKernels(self._aten)  # optional package, simply absent
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
        return _TorchFlashKernels(self._aten)

    def _lse_padded(self, kernels, like: torch.Tensor) -> bool:
        """Whether `kernels` use the padded lse layout; one tiny forward call if not yet seen."""
        if kernels.lse_padded is None:
            x = torch.zeros(3, 1, 8, dtype=like.dtype, device=like.device)
            cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=like.device)
            lse = kernels.forward(x, x, x, cu, cu, 2, 2, False, 1.0)[1]
            kernels.lse_padded = lse.dim() == 3
        return kernels.lse_padded

    def _kernel_forward(self, kernels, q, k, v, cu_q, cu_kv, max_q, max_kv, causal, scale):
        """One kernel call on packed input -> (out [t, n, d], lse [n, t] in our convention)."""
        t_q, n = q.shape[0], q.shape[1]
        if t_q == 0 or k.shape[0] == 0:
            # nothing to compute, or no key at all: output 0, lse -inf (no kernel call)
            return (q.new_zeros((t_q, n, v.shape[-1])),
                    q.new_full((n, t_q), -math.inf, dtype=torch.float32))
        out, lse = kernels.forward(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_kv,
                                   max_q, max_kv, causal, scale)
        kernels.lse_padded = lse.dim() == 3
        if kernels.lse_padded:
            lse = _lse_padded_to_packed(lse, cu_q, t_q)
        return out, _lse_from_kernel(lse)

    def _kernel_backward(self, kernels, dout, q, k, v, out, lse, cu_q, cu_kv, max_q, max_kv,
                         causal, scale):
        """One kernel call on packed input, for the given out and lse ([n, t], ours)."""
        if q.shape[0] == 0 or k.shape[0] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        lse = _lse_for_kernel(lse)
        if self._lse_padded(kernels, q):
            lse = _lse_packed_to_padded(lse, cu_q, max_q)
        return kernels.backward(dout.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(),
                                v.contiguous(), out.to(q.dtype).contiguous(), lse, cu_q, cu_kv,
                                max_q, max_kv, causal, scale)

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
            dk.index_add_(0, keys, g_k.float())
            dv.index_add_(0, keys, g_v.float())
        return dq, dk.to(p.k.dtype), dv.to(p.v.dtype)

    # ---------------------------------------------------------------- attention
    def _fallback_reason(self, q, k, v) -> Optional[str]:
        reason = _flash_unsupported_reason(q, k, v)
        if reason is not None:
            self._warn_once(f"cuda backend: the flash kernels cannot take {reason}; using the "
                            "reference attention (exact, memory O(s^2))")
        return reason

    def attention_forward(self, q, k, v, params: AttentionParams
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = default_scale(q.shape[-1], params.scale)
        if self._fallback_reason(q, k, v) is not None:
            return reference.attention_reference(q, k, v, params)
        kernels = self._kernels()
        p = _to_varlen(q, k, v, params)
        out, lse = self._varlen_forward(kernels, p, params.mask, scale)
        if p.dense is None:
            return out, lse
        b, s_q = p.dense
        # [b*s, n, d] -> [b, s, n, d]; [n, b*s] -> [b, n, s]
        return (out.view(b, s_q, *out.shape[1:]),
                lse.view(lse.shape[0], b, s_q).transpose(0, 1).contiguous())

    def attention_backward(self, dout, q, k, v, out, lse, params: AttentionParams):
        scale = default_scale(q.shape[-1], params.scale)
        if self._fallback_reason(q, k, v) is not None:
            return reference.attention_backward_reference(dout, q, k, v, out, lse, params)
        kernels = self._kernels()
        p = _to_varlen(q, k, v, params)
        if p.dense is not None:
            dout, out = dout.reshape(p.q.shape[:-1] + dout.shape[-1:]), out.reshape(
                p.q.shape[:-1] + out.shape[-1:])
            lse = lse.transpose(0, 1).reshape(lse.shape[1], -1)  # [b, n, s] -> [n, b*s]
        dq, dk, dv = self._varlen_backward(kernels, p, dout, out, lse, params.mask, scale)
        if p.dense is not None:
            return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
        return dq, dk, dv
