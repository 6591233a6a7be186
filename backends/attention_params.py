"""The attention parameters every backend takes: mask kind, scale and packed-sequence bounds.

One object instead of six loose keyword arguments, built ONCE per batch (or per ring step) by the
caller and handed to every layer's `Backend.attention*` call:

* `mask` is one of `MASK_KINDS`:
  - "none": every query row sees every key of its sequence;
  - "causal": top-left aligned, row i sees keys j <= i (per sequence when packed);
  - "causal_bottom_right": row i sees keys j <= i + (s_kv - s_q) - a new chunk after earlier
    keys (ring steps, chunked prefill, decode against a cache). Equals "causal" when s_q == s_kv;
    with s_q > s_kv the first s_q - s_kv rows see no key (output 0, lse -inf).
* packed (THD) input carries cumulative lengths with a leading 0 twice: as int32 tensors on the
  compute device (what CUDA kernels read) and as host tuples (what the NPU op, per-sequence
  loops and the top-left split need). Backends read lengths from the host tuples, so a call
  whose caller filled them makes no host-device synchronisation. `packed()` fills both from
  host ints, building the device tensors once.

Lengths come from cumulative lengths in exactly one place, `lengths_from_cu`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Tuple

import torch

MaskKind = Literal["none", "causal", "causal_bottom_right"]
MASK_KINDS: Tuple[str, ...] = ("none", "causal", "causal_bottom_right")


def lengths_from_cu(cu: Sequence[int]) -> Tuple[int, ...]:
    """Per-sequence lengths from cumulative lengths with a leading 0: [0, 3, 8] -> (3, 5).

    Raises ValueError naming the values when `cu` is empty, does not start at 0 or decreases.
    """
    values = tuple(int(x) for x in cu)
    if not values or values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError("cumulative sequence lengths must start at 0 and be non-decreasing "
                         f"(megatron convention, e.g. lengths [3, 5] -> [0, 3, 8]), got "
                         f"{list(values[:8])}{' ...' if len(values) > 8 else ''}")
    return tuple(b - a for a, b in zip(values, values[1:]))


def _host_tuple(cu: Sequence[int], name: str) -> Tuple[int, ...]:
    if isinstance(cu, torch.Tensor):
        if cu.device.type != "cpu":
            raise TypeError(f"{name} must be host ints (a list, tuple or CPU tensor); got a "
                            f"tensor on {cu.device}, whose values would need a device sync")
        cu = cu.tolist()
    values = tuple(int(x) for x in cu)
    lengths_from_cu(values)  # validates
    return values


@dataclass(frozen=True, eq=False)
class AttentionParams:
    """What an attention call needs besides q, k, v (see the module doc).

    Tensor fields make value equality meaningless, so instances compare by identity.
    """

    mask: MaskKind = "none"
    scale: Optional[float] = None  # None -> 1/sqrt(d)
    cu_seqlens_q: Optional[torch.Tensor] = None  # int32, on the compute device, leading 0
    cu_seqlens_kv: Optional[torch.Tensor] = None  # None -> the same as cu_seqlens_q
    cu_seqlens_q_host: Optional[Tuple[int, ...]] = None  # the same values on the host
    cu_seqlens_kv_host: Optional[Tuple[int, ...]] = None
    max_seqlen_q: Optional[int] = None  # host ints
    max_seqlen_kv: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mask not in MASK_KINDS:
            raise ValueError(f"attention mask {self.mask!r}: choose one of {', '.join(MASK_KINDS)}")
        if self.cu_seqlens_kv is not None and self.cu_seqlens_q is None:
            raise ValueError("cu_seqlens_kv given without cu_seqlens_q")
        if self.cu_seqlens_kv_host is not None and self.cu_seqlens_q_host is None:
            raise ValueError("cu_seqlens_kv_host given without cu_seqlens_q_host")
        for name in ("cu_seqlens_q_host", "cu_seqlens_kv_host"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _host_tuple(value, name))
        q_host, kv_host = self.cu_seqlens_q_host, self.cu_seqlens_kv_host
        if q_host is not None and kv_host is not None and len(q_host) != len(kv_host):
            raise ValueError(f"cu_seqlens_q_host and cu_seqlens_kv_host describe {len(q_host) - 1} "
                             f"and {len(kv_host) - 1} sequences; they must describe the same ones")

    # ------------------------------------------------------------------ builders
    @classmethod
    def dense(cls, mask: MaskKind = "none", scale: Optional[float] = None) -> "AttentionParams":
        """Parameters of dense `[b, s, n, d]` attention."""
        return cls(mask=mask, scale=scale)

    @classmethod
    def packed(cls, cu_seqlens_q: Sequence[int], cu_seqlens_kv: Optional[Sequence[int]] = None,
               *, mask: MaskKind, scale: Optional[float] = None,
               device=None) -> "AttentionParams":
        """Parameters of packed `[t, n, d]` attention from HOST cumulative lengths (leading 0).

        The int32 device tensors are built here, once (one host-to-device copy per batch, not
        per layer); max lengths are computed on the host. `cu_seqlens_kv=None`: kv has the
        query's sequences. `device`: the compute device (default CPU).
        """
        q_host = _host_tuple(cu_seqlens_q, "cu_seqlens_q")
        kv_host = q_host if cu_seqlens_kv is None else _host_tuple(cu_seqlens_kv, "cu_seqlens_kv")
        cu_q = torch.tensor(q_host, dtype=torch.int32, device=device)
        cu_kv = cu_q if kv_host == q_host else torch.tensor(kv_host, dtype=torch.int32,
                                                            device=device)
        return cls(mask=mask, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
                   cu_seqlens_q_host=q_host, cu_seqlens_kv_host=kv_host,
                   max_seqlen_q=max(lengths_from_cu(q_host), default=0),
                   max_seqlen_kv=max(lengths_from_cu(kv_host), default=0))

    def with_mask(self, mask: MaskKind) -> "AttentionParams":
        """The same parameters with another mask kind."""
        return dataclasses.replace(self, mask=mask)

    # ----------------------------------------------------------------- queries
    @property
    def is_packed(self) -> bool:
        """True for packed `[t, n, d]` input with cumulative lengths."""
        return self.cu_seqlens_q is not None or self.cu_seqlens_q_host is not None

    def host_cu_seqlens_q(self) -> Tuple[int, ...]:
        """Cumulative query lengths on the host: the host tuple, else read from the tensor
        (one device sync - callers on a hot path pass `cu_seqlens_q_host`)."""
        if self.cu_seqlens_q_host is not None:
            return self.cu_seqlens_q_host
        if self.cu_seqlens_q is None:
            raise ValueError("dense attention parameters have no cumulative lengths")
        return _host_tuple(self.cu_seqlens_q.cpu(), "cu_seqlens_q")

    def host_cu_seqlens_kv(self) -> Tuple[int, ...]:
        """Cumulative key/value lengths on the host (the query's when kv has none of its own)."""
        if self.cu_seqlens_kv_host is not None:
            return self.cu_seqlens_kv_host
        if self.cu_seqlens_kv is None or self.cu_seqlens_kv is self.cu_seqlens_q:
            return self.host_cu_seqlens_q()
        values = _host_tuple(self.cu_seqlens_kv.cpu(), "cu_seqlens_kv")
        if len(values) != len(self.host_cu_seqlens_q()):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_kv describe "
                             f"{len(self.host_cu_seqlens_q()) - 1} and {len(values) - 1} "
                             "sequences; they must describe the same ones")
        return values

    def seqlens_q(self) -> Tuple[int, ...]:
        """Per-sequence query lengths (from the host tuple)."""
        return lengths_from_cu(self.host_cu_seqlens_q())

    def seqlens_kv(self) -> Tuple[int, ...]:
        """Per-sequence key/value lengths (from the host tuple)."""
        return lengths_from_cu(self.host_cu_seqlens_kv())

    def device_cu_seqlens(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cu_q, cu_kv) as int32 tensors on `device`: the given tensors when they are there
        already (no copy), else built from the host tuples."""
        def on(tensor, host):
            if tensor is not None and tensor.device == torch.device(device) and \
                    tensor.dtype == torch.int32:
                return tensor.contiguous()
            if tensor is not None:
                return tensor.to(device=device, dtype=torch.int32).contiguous()
            return torch.tensor(host, dtype=torch.int32, device=device)
        cu_q = on(self.cu_seqlens_q, self.cu_seqlens_q_host)
        if self.cu_seqlens_kv is None and self.cu_seqlens_kv_host in (None,
                                                                      self.cu_seqlens_q_host):
            return cu_q, cu_q
        if self.cu_seqlens_kv is self.cu_seqlens_q and self.cu_seqlens_kv is not None:
            return cu_q, cu_q
        return cu_q, on(self.cu_seqlens_kv, self.host_cu_seqlens_kv())

    def max_seqlens(self) -> Tuple[int, int]:
        """(max_seqlen_q, max_seqlen_kv): the given host ints, else from the host lengths."""
        max_q = self.max_seqlen_q
        max_kv = self.max_seqlen_kv
        if max_q is None:
            max_q = max(self.seqlens_q(), default=0)
        if max_kv is None:
            max_kv = max(self.seqlens_kv(), default=0)
        return int(max_q), int(max_kv)


__all__ = ["AttentionParams", "MASK_KINDS", "MaskKind", "lengths_from_cu"]
