"""Ascend NPU backend: torch_npu's fused kernels, HCCL collectives, optional MindSpeed adaptation.

torch_npu is imported lazily (in `probe()` and the constructor), never at module import, so this
file can be imported on any machine. Tests pass `torch_npu_module=FakeTorchNPU()` (a CPU fake
with the same op contracts, backends/fakes/torch_npu_fake.py).

How the protocol of `backends.base` maps onto `npu_fusion_attention` (docs/npu-op-contract.md):

* dense [b, s, n, d] is layout "BSND"; packed [t, n, d] is "TND" with `actual_seq_qlen/kvlen` =
  cumulative ends WITHOUT the leading 0, as Python ints taken from the params' host tuples
  (no device sync when the caller filled them). The kernel accepts more rows than the lengths
  cover and leaves the rest uninitialised, so the row counts are checked here.
* mask kinds: "causal" (top-left) is sparse_mode 2, per sequence for any lengths in TND;
  "causal_bottom_right" is sparse_mode 3, except in TND where a sequence has s_q > s_kv (mode 3
  refuses it) and the band mode 4 (bottom-right origin, next_tockens 0) says the same; all need
  the compressed 2048x2048 upper-triangle mask, built once per device. "none" passes no mask,
  which the kernel treats as full attention.
* `scale` is always passed: the op's default is 1.0, not 1/sqrt(d).
* the op's statistics (row max m and row sum l, fp32, 8 identical lanes) become
  lse = m + log(l); dense [b, n, s] from [b, n, s, 8]; packed [n, t] from the [t, n, 8] buffer
  that the kernel fills per sequence in N-major order. A fully masked row has m = -FLT_MAX and
  l = +FLT_MAX (a finite lse near -3.4e38), mapped to the protocol's -inf. The backward hands
  a given (possibly merged) lse back as (softmax_max=lse, softmax_sum=1) in the same layout, so
  the grad kernel's P = exp(S - m) / l is exactly exp(S - lse); rows without keys get back the
  kernel's own (-FLT_MAX, +FLT_MAX).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import warnings
from typing import Dict, Optional, Tuple

import torch

from backends.attention_params import AttentionParams
from backends.base import Backend, BackendUnavailableError, default_scale

#: side of the compressed causal mask sparse modes 2/3 read with offsets
_COMPRESSED_MASK_SIZE = 2048
#: sparse_mode values (torch_npu doc): 0 = mask as given (none here), 2 = top-left causal per
#: sequence (any lengths), 3 = bottom-right causal per sequence (TND: s_q <= s_kv only),
#: 4 = band with a bottom-right origin (pre/next tokens)
_SPARSE_NONE, _SPARSE_LEFT_UP_CAUSAL, _SPARSE_RIGHT_DOWN_CAUSAL, _SPARSE_BAND = 0, 2, 3, 4
#: the kernel's statistics of a fully masked row: max = -FLT_MAX, sum = +FLT_MAX, so
#: lse = max + log(sum) is about -3.4e38; anything below this bound is such a row
_FLT_MAX = torch.finfo(torch.float32).max
_MASKED_LSE = -1e30
_STAT_LANES = 8
#: where the CANN environment script lives: CANN <= 8.x installs under ascend-toolkit, CANN 9.x
#: under cann (docs/npu-op-contract.md 4.2)
_CANN_ENV_SCRIPTS = ("/usr/local/Ascend/ascend-toolkit/set_env.sh", "/usr/local/Ascend/cann/set_env.sh")
#: the only megatron-core every MindSpeed release branch pairs with (docs/npu-op-contract.md 5: core_v0.12.1)
MINDSPEED_MEGATRON_CORE = "0.12.1"
_MINDSPEED_INSTALL_DOC = ("MindSpeed's install guide (https://gitcode.com/Ascend/MindSpeed, "
                          "docs/zh/user-guide/install_guide.md; the PyPI package 'mindspeed' is a placeholder)")


def _torch_release() -> str:
    """torch's public version without a local tag: '2.7.1+cpu' -> '2.7.1'."""
    return torch.__version__.split("+")[0]


def _first_clause(exc: BaseException) -> str:
    """The first line / sentence of an exception message (CANN errors span several lines)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def _cann_env_hint() -> str:
    """How to source the CANN environment: the script that exists here, else both locations."""
    present = [path for path in _CANN_ENV_SCRIPTS if os.path.isfile(path)]
    if present:
        return f"'source {present[0]}'"
    return f"'source {_CANN_ENV_SCRIPTS[0]}' (CANN 8.x) or 'source {_CANN_ENV_SCRIPTS[1]}' (CANN 9.x)"


def _import_error_sentence(exc: BaseException) -> str:
    version = _torch_release()
    # 'torch-npu==X.Y.Z' would not match the X.Y.Z.postN builds, and the .postN picks the CANN release
    return (f"backend 'npu' cannot run: torch_npu failed to import ({type(exc).__name__}: {_first_clause(exc)}); "
            f"install the CANN toolkit and run {_cann_env_hint()}, then 'pip install torch-npu=={version}.*' "
            f"(a torch_npu wheel X.Y.Z[.postN] needs torch X.Y.Z, here {version}, and its .postN build fixes "
            "the CANN release), or choose MINDSPEED_VITA_BACKEND=cpu")


def _no_device_sentence() -> str:
    return ("backend 'npu' cannot run: torch_npu imports but no Ascend NPU is visible (torch.npu.is_available() is "
            f"False); check 'npu-smi info' and ASCEND_RT_VISIBLE_DEVICES, run {_cann_env_hint()}, "
            "or choose MINDSPEED_VITA_BACKEND=cpu")


def _megatron_core_version() -> Optional[str]:
    """The version of the megatron-core that `import megatron.core` would load, read without
    importing it (MindSpeed must patch megatron before its first import): the package_info.py
    next to it (Megatron-LM on PYTHONPATH has no distribution metadata), else the installed
    distribution's metadata; None when neither says."""
    try:
        spec = importlib.util.find_spec("megatron")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, "core", "package_info.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            parts = [re.search(rf"^{key}\s*=\s*(\d+)", text, re.M) for key in ("MAJOR", "MINOR", "PATCH")]
            if all(parts):
                return ".".join(part.group(1) for part in parts)
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def _mindspeed_version_sentence(found: Optional[str]) -> str:
    found = f"megatron-core {found} is what imports here" if found else "this megatron-core's version is unknown"
    return (f"use_mindspeed is set but MindSpeed pairs only with megatron-core {MINDSPEED_MEGATRON_CORE} "
            f"(Megatron-LM tag core_v{MINDSPEED_MEGATRON_CORE}) and {found}; install "
            f"megatron-core=={MINDSPEED_MEGATRON_CORE} (or put Megatron-LM core_v{MINDSPEED_MEGATRON_CORE} on "
            "PYTHONPATH), or run without use_mindspeed")


def _tnd_stat_index(cu_seqlens: torch.Tensor, total: int, heads: int) -> torch.Tensor:
    """[n, t] positions of lane-0 statistics in the kernel's per-sequence N-major TND buffer.

    Sequence b (start c_b, length s_b) owns the block [c_b * n, (c_b + s_b) * n) laid out as
    [n, s_b]; token t of it at head h sits at c_b * n + h * s_b + (t - c_b). Computed on the
    device from the device cumulative lengths and the host total (`output_size`), so no sync.
    """
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths,
                                       output_size=total)
    start, length = cu[:-1][sequence], lengths[sequence]
    token = torch.arange(total, device=cu.device)
    head = torch.arange(heads, device=cu.device).view(heads, 1)
    return start.view(1, -1) * heads + head * length.view(1, -1) + (token - start).view(1, -1)


def _lse_from_stats(softmax_max: torch.Tensor, softmax_sum: torch.Tensor) -> torch.Tensor:
    """lse = m + log(l) from lane 0; a fully masked row (m = -FLT_MAX, l = +FLT_MAX from the
    kernel, a finite ~-3.4e38) becomes -inf, the protocol's value."""
    lse = softmax_max[..., 0] + torch.log(softmax_sum[..., 0])
    return lse.masked_fill(lse < _MASKED_LSE, float("-inf"))


def _stats_for_grad(lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m, l) the grad kernel reads so that its P = exp(S - m) / l is exp(S - lse): m = lse,
    l = 1; rows without keys get back what the forward kernel wrote for them (-FLT_MAX,
    +FLT_MAX) rather than -inf."""
    lse = lse.float()
    masked = lse == float("-inf")
    softmax_max = lse.masked_fill(masked, -_FLT_MAX)
    softmax_sum = torch.ones_like(lse).masked_fill(masked, _FLT_MAX)
    return softmax_max, softmax_sum


class NPUBackend(Backend):
    """Ascend NPUs: torch_npu fused kernels, HCCL collectives, MindSpeed when asked for."""

    name = "npu"
    dist_backend = "hccl"
    option_names = ("use_mindspeed",)

    def __init__(self, torch_npu_module=None, *, use_mindspeed: bool = False) -> None:
        """`torch_npu_module`: the torch_npu module to call (tests pass the CPU fake); imported
        when None. `use_mindspeed`: `adapt_megatron()` imports `mindspeed.megatron_adaptor`."""
        if torch_npu_module is None:
            try:
                import torch_npu as torch_npu_module  # noqa: F401 - registers the "npu" device
            except (ImportError, OSError, RuntimeError) as exc:
                raise BackendUnavailableError(_import_error_sentence(exc)) from exc
        self._ops = torch_npu_module
        self._npu = torch_npu_module.npu  # the module behind torch.npu
        self._use_mindspeed = use_mindspeed
        self._megatron_adapted = False
        self._causal_masks: Dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ runtime
    @classmethod
    def probe(cls) -> Optional[str]:
        """None when torch_npu imports and an NPU is visible, else one sentence on how to fix it."""
        try:
            import torch_npu
        except (ImportError, OSError, RuntimeError) as exc:
            return _import_error_sentence(exc)
        try:
            available = bool(torch_npu.npu.is_available())
        except (AttributeError, RuntimeError):
            available = False
        return None if available else _no_device_sentence()

    def device(self, local_rank: Optional[int] = None) -> torch.device:
        index = self._npu.current_device() if local_rank is None else local_rank
        return torch.device("npu", index)

    def set_device(self, local_rank: int = 0) -> None:
        self._npu.set_device(local_rank)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._npu.manual_seed_all(seed)

    def synchronize(self) -> None:
        self._npu.synchronize()

    def reset_peak_memory_stats(self) -> None:
        self._npu.reset_peak_memory_stats()

    def max_memory_allocated(self) -> int:
        return int(self._npu.max_memory_allocated())

    # ---------------------------------------------------------------- attention
    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        """The compressed causal mask (True above the diagonal = masked), one per device."""
        if device not in self._causal_masks:
            size = _COMPRESSED_MASK_SIZE
            self._causal_masks[device] = torch.triu(
                torch.ones(size, size, dtype=torch.bool, device=device), diagonal=1)
        return self._causal_masks[device]

    def _call_args(self, q, k, params: AttentionParams) -> dict:
        """Layout, mask and lengths shared by forward and backward (host values only)."""
        packed = params.is_packed
        expected_dim = 3 if packed else 4
        if q.dim() != expected_dim:
            raise ValueError(f"npu attention expects {'packed [t, n, d]' if packed else 'dense [b, s, n, d]'} "
                             f"input, got q of shape {tuple(q.shape)}")
        args = dict(head_num=q.shape[-2], input_layout="TND" if packed else "BSND",
                    scale=default_scale(q.shape[-1], params.scale), keep_prob=1.0)
        if params.mask == "none":
            args.update(atten_mask=None, sparse_mode=_SPARSE_NONE)  # no mask: full attention
            mode = _SPARSE_NONE
        elif params.mask == "causal":
            mode = _SPARSE_LEFT_UP_CAUSAL  # top-left per sequence, any lengths, dense and TND
        else:
            mode = _SPARSE_RIGHT_DOWN_CAUSAL
        if packed:
            cu_q, cu_kv = params.host_cu_seqlens_q(), params.host_cu_seqlens_kv()
            if len(cu_q) < 2:
                raise ValueError("packed npu attention needs at least one sequence in cu_seqlens_q")
            # the kernel accepts T > the sum of lengths and leaves the tail rows uninitialised
            for name, tensor, cu in (("q", q, cu_q), ("k/v", k, cu_kv)):
                if tensor.shape[0] != cu[-1]:
                    raise ValueError(f"packed {name} has {tensor.shape[0]} rows but its cumulative "
                                     f"lengths end at {cu[-1]}")
            args.update(actual_seq_qlen=list(cu_q[1:]), actual_seq_kvlen=list(cu_kv[1:]))
            if mode == _SPARSE_RIGHT_DOWN_CAUSAL and any(
                    s_q > s_kv for s_q, s_kv in zip(params.seqlens_q(), params.seqlens_kv())):
                # TND mode 3 refuses a sequence with s_q > s_kv; the band mode 4 with its
                # bottom-right origin keeps -pre <= j - i - (s_kv - s_q) <= next: next = 0 and
                # pre >= every s_kv is exactly bottom-right causal, for any lengths
                _, max_kv = params.max_seqlens()
                args.update(pre_tockens=max(max_kv, 1), next_tockens=0)
                mode = _SPARSE_BAND
        if mode != _SPARSE_NONE:
            args.update(atten_mask=self._causal_mask(q.device), sparse_mode=mode)
        return args

    def attention_forward(self, q, k, v, params: AttentionParams
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
        args = self._call_args(q, k, params)
        out, softmax_max, softmax_sum = self._ops.npu_fusion_attention(q, k, v, **args)[:3]
        lse = _lse_from_stats(softmax_max, softmax_sum)  # [b, n, s] dense; [t, n] buffer packed
        if params.is_packed:
            cu_q, _ = params.device_cu_seqlens(q.device)
            lse = lse.reshape(-1)[_tnd_stat_index(cu_q, q.shape[0], q.shape[1])]
        return out, lse

    def attention_backward(self, dout, q, k, v, out, lse, params: AttentionParams):
        args = self._call_args(q, k, params)
        args["scale_value"] = args.pop("scale")
        softmax_max, softmax_sum = _stats_for_grad(lse)
        if params.is_packed:
            cu_q, _ = params.device_cu_seqlens(q.device)
            index = _tnd_stat_index(cu_q, q.shape[0], q.shape[1])
            stats = []
            for stat in (softmax_max, softmax_sum):
                flat = stat.new_empty(stat.numel())
                flat[index] = stat
                stats.append(flat.view(q.shape[0], q.shape[1], 1))
            softmax_max, softmax_sum = stats
        else:
            softmax_max, softmax_sum = softmax_max.unsqueeze(-1), softmax_sum.unsqueeze(-1)
        lanes = softmax_max.shape[:-1] + (_STAT_LANES,)
        grads = self._ops.npu_fusion_attention_grad(
            q, k, v, dout.to(q.dtype), softmax_max=softmax_max.expand(lanes).contiguous(),
            softmax_sum=softmax_sum.expand(lanes).contiguous(), attention_in=out.to(q.dtype),
            **args)
        # 4 items before torch_npu 7.3.0, 5 (with dsink) after: only the first three matter here
        dq, dk, dv = grads[0], grads[1], grads[2]
        return dq, dk.to(k.dtype), dv.to(v.dtype)

    # ------------------------------------------------------------ fused layers
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if weight.dtype == x.dtype:
            return self._ops.npu_rms_norm(x, weight, epsilon=eps)[0]
        # Mixed dtypes (e.g. bf16 activations, fp32 weight): the protocol casts the normalised
        # value to x.dtype *before* scaling and returns the promoted dtype; the fused op would
        # scale first and return x.dtype. Normalise with a unit gamma, then scale.
        unit = torch.ones(weight.shape, dtype=x.dtype, device=x.device)
        return weight * self._ops.npu_rms_norm(x, unit, epsilon=eps)[0]

    def apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`npu_rotary_mul` (half mode) for 2-D to 4-D x ([s,b,n,d], [b,s,n,d], [t,n,d], ...).

        The kernel takes 4-D input only up to torch_npu 7.2.0 (3-D from 7.3.0), so lower ranks
        are viewed as 4-D by inserting axes after the first: packed [t, n, d] becomes
        [t, 1, n, d] and its cos/sin [t, 1, d] become [t, 1, 1, d] (SBND with the S11D
        broadcast), which every release accepts. The kernel casts cos/sin to x's dtype; when
        they are wider than x, x is computed in their dtype instead, so the result is the
        reference's `x * cos + rotate_half(x) * sin` in the promoted dtype. cos/sin patterns the
        kernel does not broadcast are expanded.
        """
        if not 2 <= x.dim() <= 4:
            raise ValueError(f"apply_rotary expects x with 2 to 4 dims, got shape {tuple(x.shape)}")
        if cos.dim() > x.dim() or sin.dim() > x.dim():
            raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} have more dims than x {tuple(x.shape)}")
        dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        shape = x.shape
        x4 = x.to(dtype)
        cos, sin = (t.to(dtype).reshape((1,) * (x.dim() - t.dim()) + tuple(t.shape)) for t in (cos, sin))
        while x4.dim() < 4:
            x4, cos, sin = x4.unsqueeze(1), cos.unsqueeze(1), sin.unsqueeze(1)
        cos, sin = self._rotary_operand(cos, x4), self._rotary_operand(sin, x4)
        return self._ops.npu_rotary_mul(x4, cos, sin).reshape(shape)

    @staticmethod
    def _rotary_operand(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """r itself when its leading dims form a pattern the kernel accepts, else r expanded to x."""
        lead = tuple(x.shape[:-1])
        try:
            torch.broadcast_shapes(r.shape, x.shape)
        except RuntimeError as exc:
            raise ValueError(f"cos/sin {tuple(r.shape)} do not broadcast against x {tuple(x.shape)}") from exc
        if r.shape[-1] != x.shape[-1]:
            return r.expand(x.shape).contiguous()
        a, b, c = lead  # x is 4-D here
        allowed = {(1, 1, c), (a, 1, c), (a, b, c), (1, b, 1), (a, b, 1), (a, 1, 1)}
        if tuple(r.shape[:-1]) in allowed:
            return r
        return r.expand(x.shape).contiguous()

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.npu_swiglu(x.contiguous(), dim=-1)

    # --------------------------------------------------------------- engines
    def adapt_megatron(self) -> None:
        """With `use_mindspeed=True`, import `mindspeed.megatron_adaptor` once (it patches
        megatron-core for NPU and applies torch_npu's transfer_to_npu); otherwise nothing.

        MindSpeed patches functions by dotted path, so objects bound by an earlier
        `from megatron... import X` stay unpatched: call this before importing megatron.
        """
        if not self._use_mindspeed or self._megatron_adapted:
            return
        version = _megatron_core_version()
        release = None if version is None else re.match(r"\d+\.\d+\.\d+", version)
        if version is not None and (release is None or release.group(0) != MINDSPEED_MEGATRON_CORE):
            raise BackendUnavailableError(_mindspeed_version_sentence(version))
        if any(name == "megatron" or name.startswith("megatron.") for name in sys.modules):
            warnings.warn("mindspeed.megatron_adaptor is applied after megatron was imported; names bound "
                          "earlier with 'from megatron... import' keep their unpatched versions")
        try:
            importlib.import_module("mindspeed.megatron_adaptor")
        except ImportError as exc:
            raise BackendUnavailableError(
                f"use_mindspeed is set but mindspeed.megatron_adaptor does not import ({_first_clause(exc)}); "
                f"install MindSpeed and its matching Megatron-LM as {_MINDSPEED_INSTALL_DOC} describes, "
                "or run without use_mindspeed") from exc
        except RuntimeError as exc:
            # MindSpeed raises RuntimeError('no exist ...') when a megatron object it patches is
            # missing: a megatron-core other than the one it pairs with
            raise BackendUnavailableError(_mindspeed_version_sentence(version)) from exc
        self._megatron_adapted = True
