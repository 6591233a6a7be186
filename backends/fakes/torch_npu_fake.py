"""A CPU stand-in for `torch_npu`: the fused ops the NPU backend calls, with their exact contracts.

`FakeTorchNPU()` is a module-like object with the attributes of `torch_npu` that this project uses:

* `npu_fusion_attention` / `npu_fusion_attention_grad` (FlashAttentionScore and its grad),
* `npu_rms_norm`, `npu_rotary_mul`, `npu_swiglu`,
* `npu`: a `torch.npu`-like namespace (device count, set_device, seeds, memory stats).

It computes on CPU tensors with straightforward math (scores materialised in fp32) and mimics
what the real ops do with their arguments: layouts BSH/SBH/BSND/BNSD/TND, `atten_mask` True =
masked, sparse modes 0-8 with the compressed 2048x2048 mask, pre/next token bands, cumulative
sequence ends without a leading 0, GQA by contiguous head groups, `scale` defaulting to 1.0,
softmax statistics replicated in 8 fp32 lanes (TND in the kernel's per-sequence N-major order),
the kernel's statistics of a fully masked row (max = -FLT_MAX, sum = +FLT_MAX), rows beyond the
cumulative lengths left uninitialised (NaN), the documented limits (head dim <= 768, heads <=
256, T <= 1M, <= 2K varlen sequences), `npu_rotary_mul` taking 4-D input only before 7.3.0 and
casting cos/sin to x's dtype, and the wrapper's RuntimeErrors. The rules are written down in
docs/npu-op-contract.md (cited below by its section numbers, "contract 1.5" etc.). Where the real
behaviour is unknown the fake raises instead of guessing: dropout (keep_prob < 1), `sink`,
`padding_mask`, pse with TND.

`release` selects the torch_npu release emulated: keyword arguments added in later releases
(`softmax_layout` 7.2.0, `sink` 7.3.0, `dropout_mask`/`seed`/`offset` 26.0.0, `rotate` 26.0.0)
raise TypeError when passed to an earlier one, and `npu_fusion_attention_grad` returns 4 items
before 7.3.0 and 5 (with `dsink`) from 7.3.0 on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

#: side of the compressed causal mask that sparse modes 2, 3, 4, 7 and 8 require (contract 1.4)
COMPRESSED_MASK_SIZE = 2048
#: default of pre_tockens / next_tockens (int32 max): "no band limit"
MAX_TOCKENS = 2147483647

#: documented limits (contract 1.6, 1.8): head dim, query heads,
#: sequence length / T, and entries of actual_seq_qlen / actual_seq_kvlen
MAX_HEAD_DIM = 768
MAX_HEADS = 256
MAX_TOKENS = 1024 * 1024
MAX_VARLEN_SEQUENCES = 2048
#: what the kernel writes for a fully masked row: max = -FLT_MAX, sum = +FLT_MAX (contract 1.5)
FLT_MAX = torch.finfo(torch.float32).max

_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COMPRESSED_MODES = (2, 3, 4, 7, 8)
_STAT_LANES = 8


class _Unset:
    """Marks a keyword that was not passed (so release-gated keywords can be detected)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def _release_tuple(release: str) -> Tuple[int, ...]:
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", release)
    if match is None:
        raise ValueError(f"release must look like '7.2.0', got {release!r}")
    return tuple(int(part) for part in match.groups())


# --------------------------------------------------------------------------- attention problem
@dataclass
class _Segment:
    """One independent attention problem in [B, N, S, D] form (a whole batch, or one TND sequence)."""

    q: torch.Tensor  # [B, N1, Sq, D]
    k: torch.Tensor  # [B, N2, Skv, D]
    v: torch.Tensor  # [B, N2, Skv, Dv]
    kept: Optional[torch.Tensor]  # bool, broadcastable to [B, N1, Sq, Skv]; None = attend all
    pse: Optional[torch.Tensor]  # broadcastable to [B, N1, Sq, Skv]


@dataclass
class _Geometry:
    """How the caller's tensors map onto segments and back."""

    layout: str
    head_num: int
    batch: int
    kv_heads: int
    seq_q: List[int] = field(default_factory=list)  # TND: per-sequence query lengths
    seq_kv: List[int] = field(default_factory=list)
    starts_q: List[int] = field(default_factory=list)
    starts_kv: List[int] = field(default_factory=list)
    total_q: int = 0  # TND: T of query / key (may exceed the sum of lengths: uninitialised tail)
    total_kv: int = 0


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with NaN rows appended up to `rows`: the kernel leaves rows beyond the cumulative
    lengths uninitialised, and NaN makes a caller that reads them fail loudly."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_full((rows - x.shape[0],) + tuple(x.shape[1:]), float("nan"))])


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """View a BSH/SBH/BSND/BNSD tensor as [B, N, S, D]."""
    if layout == "BSH":
        b, s, h = x.shape
        return x.view(b, s, heads, h // heads).transpose(1, 2)
    if layout == "SBH":
        s, b, h = x.shape
        return x.view(s, b, heads, h // heads).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.transpose(1, 2)
    return x  # BNSD


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of `_to_bnsd` (contiguous result in the caller's layout)."""
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    return x.contiguous()


def _parse_cumulative(name: str, cum, total: int) -> Tuple[List[int], List[int]]:
    """(starts, lengths) from cumulative END offsets without a leading 0 (contract 1.6).

    A zero-length sequence repeats the previous value; trailing zeros after a positive value
    mark skipped trailing batches. Like the kernel, T may exceed the covered rows [0, end): the
    rows beyond are left uninitialised (NaN here); T below the end is an error.
    """
    values = list(cum)
    used = len(values)
    while used > 1 and values[used - 1] == 0 and any(values[: used - 1]):
        used -= 1  # trailing zeros: skipped batches
    starts, lengths, previous = [], [], 0
    for index, end in enumerate(values[:used]):
        if end < previous:
            raise RuntimeError(
                f"{name} must be non-decreasing cumulative end offsets without a leading 0 "
                f"(e.g. lengths [2, 3] -> [2, 5]), got {values} (entry {index})"
            )
        starts.append(previous)
        lengths.append(end - previous)
        previous = end
    starts += [previous] * (len(values) - used)
    lengths += [0] * (len(values) - used)
    if previous > total:
        raise RuntimeError(f"{name} ends at {previous} but the tensor has only T={total} tokens: {values}")
    return starts, lengths


def _check_qkv(query, key, value, head_num: int, layout: str, keep_prob: float, sparse_mode: int):
    """The wrapper's checks (contract 1.8), in the wrapper's order, plus shape consistency."""
    for label, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() not in (3, 4):
            raise RuntimeError(
                f"The shapes of the input {label} should be 3 or 4 dimensional, but got {tensor.dim()}-dimensional"
            )
    if not 0 < keep_prob <= 1:
        raise RuntimeError(f"The keep_prob value must be in range of (0, 1], but got {keep_prob}")
    if layout == "TND":
        if not (0 <= sparse_mode < 5 or 5 < sparse_mode <= 8):
            raise RuntimeError(f"The sparse_mode value must be in range of [0,5) or (5,8], but got {sparse_mode}")
    elif not 0 <= sparse_mode <= 6:
        raise RuntimeError(f"The sparse_mode value must be in range of [0,6], but got {sparse_mode}")
    if layout not in _LAYOUTS:
        raise RuntimeError(f"The input_layout should be BSH/SBH/BNSD/BSND/TND(case-insensitive), but got {layout}")
    if head_num <= 0:
        raise RuntimeError(f"head_num must be greater than 0, but got {head_num}")
    if keep_prob != 1:
        raise ValueError(
            f"keep_prob={keep_prob}: the fake is exact only for keep_prob == 1 (the NPU dropout mask is "
            "generated by on-device Philox and cannot be reproduced on CPU)"
        )
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(
            f"query/key/value must share one dtype of float16/bfloat16/float32, got "
            f"{query.dtype}/{key.dtype}/{value.dtype}"
        )
    expected_dim = 3 if layout in ("BSH", "SBH", "TND") else 4
    for label, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dim() != expected_dim:
            raise RuntimeError(
                f"input_layout {layout} needs a {expected_dim}-D {label}, got shape {tuple(tensor.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise RuntimeError(f"key {tuple(key.shape)} and value {tuple(value.shape)} may differ only in D")


def _geometry(query, key, value, head_num: int, layout: str, seq_qlen, seq_kvlen) -> _Geometry:
    """Validate head/length relations for `layout` and describe the problem."""
    if layout in ("BSH", "SBH"):
        if query.shape[2] % head_num:
            raise RuntimeError(f"H={query.shape[2]} of query is not divisible by head_num={head_num}")
        head_dim = query.shape[2] // head_num
        if key.shape[2] % head_dim:
            raise RuntimeError(f"H={key.shape[2]} of key is not a multiple of D={head_dim}")
        kv_heads = key.shape[2] // head_dim
        if value.shape[2] % kv_heads:
            raise RuntimeError(f"H={value.shape[2]} of value is not a multiple of N2={kv_heads}")
        batch_axis = 0 if layout == "BSH" else 1
        batch = query.shape[batch_axis]
        if key.shape[batch_axis] != batch:
            raise RuntimeError(f"query batch {batch} != key batch {key.shape[batch_axis]}")
        q_dim, k_dim, v_dim = head_dim, head_dim, value.shape[2] // kv_heads
    else:
        head_axis = {"BSND": 2, "BNSD": 1, "TND": 1}[layout]
        if query.shape[head_axis] != head_num:
            raise RuntimeError(
                f"head_num={head_num} must equal the N axis of query ({query.shape[head_axis]}) for {layout}"
            )
        kv_heads = key.shape[head_axis]
        batch = 1 if layout == "TND" else query.shape[0]
        if layout != "TND" and key.shape[0] != batch:
            raise RuntimeError(f"query batch {batch} != key batch {key.shape[0]}")
        q_dim, k_dim, v_dim = query.shape[-1], key.shape[-1], value.shape[-1]
    if not 1 <= head_num <= MAX_HEADS:
        raise RuntimeError(f"head_num must be in [1, {MAX_HEADS}], got {head_num}")
    if kv_heads <= 0 or head_num % kv_heads:
        raise RuntimeError(f"query heads N1={head_num} must be a multiple of key/value heads N2={kv_heads}")
    if q_dim != k_dim or v_dim > q_dim:
        raise RuntimeError(f"head dims must satisfy Dq == Dk >= Dv, got Dq={q_dim}, Dk={k_dim}, Dv={v_dim}")
    if not 1 <= q_dim <= MAX_HEAD_DIM:
        raise RuntimeError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got {q_dim}")
    seq_axis = {"BSH": 1, "SBH": 0, "BSND": 1, "BNSD": 2, "TND": 0}[layout]
    for label, tensor in (("query", query), ("key", key)):
        if tensor.shape[seq_axis] > MAX_TOKENS:
            raise RuntimeError(f"the sequence length (T for TND) of {label} must be at most {MAX_TOKENS} (1M), "
                               f"got {tensor.shape[seq_axis]}")
    geometry = _Geometry(layout=layout, head_num=head_num, batch=batch, kv_heads=kv_heads)
    if layout == "TND":
        for name, cum in (("actual_seq_qlen", seq_qlen), ("actual_seq_kvlen", seq_kvlen)):
            if cum is not None and (not isinstance(cum, (list, tuple)) or
                                    not all(isinstance(c, int) and not isinstance(c, bool) for c in cum)):
                # the real binding takes int[] (host ints); a tensor is the `_v3` variant's input
                raise TypeError(f"npu_fusion_attention(): argument '{name}' must be a list of Python ints, "
                                f"not {type(cum).__name__}")
        if not seq_qlen or not seq_kvlen or len(seq_qlen) != len(seq_kvlen):
            raise RuntimeError("the size of actual_seq_qlen and actual_seq_kvlen must be the same and cannot be empty.")
        if len(seq_qlen) > MAX_VARLEN_SEQUENCES:
            raise RuntimeError(f"actual_seq_qlen/actual_seq_kvlen hold {len(seq_qlen)} sequences; at most "
                               f"{MAX_VARLEN_SEQUENCES} (2K) are supported")
        geometry.starts_q, geometry.seq_q = _parse_cumulative("actual_seq_qlen", seq_qlen, query.shape[0])
        geometry.starts_kv, geometry.seq_kv = _parse_cumulative("actual_seq_kvlen", seq_kvlen, key.shape[0])
        geometry.batch = len(geometry.seq_q)
        geometry.total_q, geometry.total_kv = query.shape[0], key.shape[0]
    return geometry


def _numels(query, key, geometry: _Geometry, seq_qlen, seq_kvlen) -> int:
    """Dropout-mask element count exactly as the wrapper computes it (contract 1.7)."""
    n1 = geometry.head_num
    if geometry.layout == "TND":
        # The wrapper differences the raw cumulative lists (trailing zeros included).
        total = seq_qlen[0] * seq_kvlen[0]
        for index in range(1, len(seq_qlen)):
            total += (seq_qlen[index] - seq_qlen[index - 1]) * (seq_kvlen[index] - seq_kvlen[index - 1])
        return n1 * total
    q4 = _to_bnsd(query, geometry.layout, n1)
    k4 = _to_bnsd(key, geometry.layout, geometry.kv_heads)
    return q4.shape[0] * n1 * q4.shape[2] * k4.shape[2]


# ------------------------------------------------------------------------------- kept regions
def _band(sq: int, skv: int, low: int, high: int) -> torch.Tensor:
    """kept[i, j] = low <= j - i <= high, as a bool [sq, skv] tensor."""
    diff = torch.arange(skv).view(1, skv) - torch.arange(sq).view(sq, 1)
    return (diff >= low) & (diff <= high)


def _check_band_tokens(pre: int, nxt: int, sq: int, skv: int) -> None:
    """Mode 0 limits on negative pre_tockens/next_tockens (contract 1.5)."""
    if pre < 0 and nxt < 0:
        raise RuntimeError(f"pre_tockens={pre} and next_tockens={nxt} cannot both be negative")
    if nxt < 0 and (pre < -nxt or -nxt >= skv):
        raise RuntimeError(f"next_tockens={nxt} < 0 needs pre_tockens >= {-nxt} and |next_tockens| < Skv={skv}")
    if pre < 0 and (nxt < -pre or -pre >= sq):
        raise RuntimeError(f"pre_tockens={pre} < 0 needs next_tockens >= {-pre} and |pre_tockens| < Sq={sq}")


def _mode_region(mode: int, sq: int, skv: int, pre: int, nxt: int, prefix: Optional[int] = None) -> torch.Tensor:
    """The [sq, skv] kept region of a mask-free sparse mode (contract 1.5 table)."""
    off = skv - sq
    if mode == 2:
        return _band(sq, skv, -MAX_TOCKENS - sq, 0)
    if mode == 3:
        return _band(sq, skv, -MAX_TOCKENS - sq, off)
    if mode == 4:  # NOTE: the sign limits of _check_band_tokens are documented for mode 0 only
        return _band(sq, skv, -pre + off, nxt + off)
    if mode in (5, 6):
        region = _band(sq, skv, -MAX_TOCKENS - sq, off)
        region[:, : max(0, min(prefix, skv))] = True
        return region
    raise AssertionError(mode)


_COMPRESSED_CACHE: dict = {}


def _expected_compressed(rows: int) -> torch.Tensor:
    """The compressed mask the kernel expects: 2048x2048 causal triangle, or mode 6's 3072x2048."""
    if rows not in _COMPRESSED_CACHE:
        size = COMPRESSED_MASK_SIZE
        mask = torch.triu(torch.ones(size, size, dtype=torch.bool), diagonal=1)
        if rows == 3072:
            bottom = torch.zeros(1024, size, dtype=torch.bool)
            bottom[:, size // 2:] = True
            mask = torch.cat([mask, bottom])
        _COMPRESSED_CACHE[rows] = mask
    return _COMPRESSED_CACHE[rows]


def _check_mask_dtype(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype not in (torch.bool, torch.uint8):
        raise RuntimeError(f"atten_mask must be bool or uint8 (True/1 = masked out), got {mask.dtype}")
    return mask.bool()


def _check_compressed(mask: torch.Tensor, mode: int) -> None:
    """Modes 2/3/4/7/8 (and 6) read a fixed compressed mask; anything else is a caller bug."""
    rows = 3072 if mode == 6 else COMPRESSED_MASK_SIZE
    if tuple(mask.shape) != (rows, COMPRESSED_MASK_SIZE):
        raise RuntimeError(
            f"sparse_mode={mode} needs the compressed atten_mask of shape [{rows}, {COMPRESSED_MASK_SIZE}], "
            f"got {tuple(mask.shape)}"
        )
    # NOTE: the kernel does not check the contents; it would silently read a wrong pattern.
    # The fake refuses, so a backend that builds the wrong triangle fails its tests.
    if not torch.equal(mask.cpu(), _expected_compressed(rows)):
        raise ValueError(
            f"sparse_mode={mode}: atten_mask must equal torch.triu(torch.ones(2048, 2048, dtype=torch.bool), "
            "diagonal=1) (True above the diagonal" + (", plus mode 6's bottom 1024 rows)" if mode == 6 else ")")
        )


def _dense_kept(mask, mode, batch, heads, sq, skv, pre, nxt, prefix) -> Optional[torch.Tensor]:
    """Kept region [B|1, N1|1, Sq, Skv] for BSH/SBH/BSND/BNSD."""
    if mask is None:
        return None  # contract 1.4: no mask -> full attention, sparse_mode/pre/next ignored
    mask = _check_mask_dtype(mask)
    if mode in (0, 1):
        allowed = {(batch, heads, sq, skv), (batch, 1, sq, skv), (1, 1, sq, skv), (sq, skv)}
        if tuple(mask.shape) not in allowed:
            raise RuntimeError(
                f"sparse_mode={mode}: atten_mask shape {tuple(mask.shape)} must be one of "
                f"[B,N1,Sq,Skv], [B,1,Sq,Skv], [1,1,Sq,Skv], [Sq,Skv] = {sorted(allowed, key=len)}"
            )
        kept = ~mask.cpu()
        if mode == 0:
            _check_band_tokens(pre, nxt, sq, skv)
            kept = kept & _band(sq, skv, -pre, nxt)
        return kept if kept.dim() == 4 else kept.view(1, 1, sq, skv)
    if mode == 5:
        if tuple(mask.shape) not in {(batch, heads, sq, skv), (batch, 1, sq, skv)}:
            raise RuntimeError(
                f"sparse_mode=5 needs a full [B,N1,Sq,Skv] or [B,1,Sq,Skv] mask, got {tuple(mask.shape)}")
    else:
        _check_compressed(mask, mode)
    if mode in (5, 6):
        prefix = _check_prefix(prefix, batch)
        return torch.stack([_mode_region(mode, sq, skv, pre, nxt, p) for p in prefix]).unsqueeze(1)
    return _mode_region(mode, sq, skv, pre, nxt).view(1, 1, sq, skv)


def _check_prefix(prefix, batch: int) -> List[int]:
    if prefix is None or len(prefix) != batch:
        raise RuntimeError(f"sparse_mode 5/6 needs prefix as a list of {batch} ints (one per batch), got {prefix}")
    return [int(p) for p in prefix]


def _varlen_kept(mask, mode, geometry: _Geometry, pre, nxt, prefix) -> List[Optional[torch.Tensor]]:
    """Per-sequence kept regions [1, 1, sq_b, skv_b] for TND (contract 1.5, modes 7/8 included)."""
    count = geometry.batch
    if mask is None:
        return [None] * count
    mask = _check_mask_dtype(mask)
    sq_list, skv_list = geometry.seq_q, geometry.seq_kv
    if mode in (0, 1):
        need = (max(sq_list), max(skv_list))
        if tuple(mask.shape) != need:
            raise RuntimeError(f"TND atten_mask for sparse_mode={mode} must be [maxSq, maxSkv] = {list(need)}, "
                               f"got {tuple(mask.shape)}")
    else:
        _check_compressed(mask, mode)
    prefixes = _check_prefix(prefix, count) if mode == 6 else [None] * count
    non_empty = [b for b in range(count) if sq_list[b] > 0 and skv_list[b] > 0]
    band_seq = None
    if mode == 7 and non_empty:
        band_seq = non_empty[-1]
        sq, skv = sq_list[band_seq], skv_list[band_seq]
        if pre < skv or not sq - skv <= nxt <= 0:
            raise RuntimeError(
                f"sparse_mode=7 needs pre_tockens >= last Skv ({skv}) and last Sq - last Skv ({sq - skv}) "
                f"<= next_tockens <= 0, got pre_tockens={pre}, next_tockens={nxt}"
            )
    if mode == 8 and non_empty:
        band_seq = non_empty[0]
        sq, skv = sq_list[band_seq], skv_list[band_seq]
        if pre < skv or nxt < sq - skv:
            raise RuntimeError(
                f"sparse_mode=8 needs pre_tockens >= first Skv ({skv}) and next_tockens >= first Sq - first "
                f"Skv ({sq - skv}), got pre_tockens={pre}, next_tockens={nxt}"
            )
    regions = []
    for b in range(count):
        sq, skv = sq_list[b], skv_list[b]
        if mode == 0:
            _check_band_tokens(pre, nxt, sq, skv)
            region = ~mask[:sq, :skv].cpu() & _band(sq, skv, -pre, nxt)
        elif mode == 1:
            region = ~mask[:sq, :skv].cpu()
        elif b == band_seq:
            region = _mode_region(4, sq, skv, pre, nxt)
        elif mode in (3, 7):
            if sq > skv:
                raise RuntimeError(
                    f"sparse_mode={mode} (TND) needs Sq <= Skv per sequence; sequence {b} has {sq} > {skv}")
            region = _mode_region(3, sq, skv, pre, nxt)
        elif mode in (2, 8):
            region = _mode_region(2, sq, skv, pre, nxt)
        else:
            region = _mode_region(mode, sq, skv, pre, nxt, prefixes[b])
        regions.append(region.view(1, 1, sq, skv))
    return regions


# -------------------------------------------------------------------------------- the math
def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N2, S, D] -> [B, N1, S, D]: query head h uses kv head h // (N1 // N2)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _reduce_kv(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum a [B, N1, S, D] gradient over each GQA group -> [B, N2, S, D]."""
    b, n1, s, d = x.shape
    return x.view(b, kv_heads, n1 // kv_heads, s, d).sum(dim=2)


def _scores(seg: _Segment, scale: float) -> torch.Tensor:
    """fp32 scale * (pse + Q K^T) with -inf where not kept (pse before scaling, contract 1.2)."""
    heads = seg.q.shape[1]
    logits = seg.q.float() @ _expand_kv(seg.k, heads).float().transpose(-1, -2)
    if seg.pse is not None:
        logits = logits + seg.pse.float()
    logits = logits * scale
    if seg.kept is not None:
        logits = logits.masked_fill(~seg.kept, float("-inf"))
    return logits


def _forward_segment(seg: _Segment, scale: float):
    """(out fp32 [B,N1,Sq,Dv], m [B,N1,Sq], l [B,N1,Sq]).

    A row that sees no key gets output 0 and, as the kernel writes it, m = -FLT_MAX and
    l = +FLT_MAX (a finite lse near -3.4e38, not -inf); a sequence without any key is
    zero-initialised by the kernel (m = l = 0, output 0).
    """
    scores = _scores(seg, scale)
    if scores.shape[-1] == 0:
        zeros = scores.new_zeros(scores.shape[:-1])
        out = scores.new_zeros(scores.shape[:-1] + (seg.v.shape[-1],))
        return out, zeros, zeros.clone()
    row_max = scores.amax(dim=-1)
    dead = torch.isneginf(row_max)
    safe_max = torch.where(dead, torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - safe_max.unsqueeze(-1))
    row_sum = weights.sum(dim=-1)
    denominator = row_sum.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    out = (weights @ _expand_kv(seg.v, seg.q.shape[1]).float()) / denominator
    out = torch.where(dead.unsqueeze(-1), torch.zeros_like(out), out)
    row_max = torch.where(dead, torch.full_like(row_max, -FLT_MAX), row_max)
    row_sum = torch.where(dead, torch.full_like(row_sum, FLT_MAX), row_sum)
    return out, row_max, row_sum


def _backward_segment(seg: _Segment, dy, out, row_max, row_sum, scale: float):
    """Gradients with the GIVEN statistics and output (contract 2): P = exp(S - m) / l on kept."""
    heads, kv_heads = seg.q.shape[1], seg.k.shape[1]
    scores = _scores(seg, scale)
    probs = torch.exp(scores - row_max.unsqueeze(-1)) / row_sum.unsqueeze(-1)
    kept = torch.isfinite(scores) if seg.kept is None else seg.kept & torch.isfinite(scores)
    probs = torch.where(kept, probs, torch.zeros_like(probs))
    dy32 = dy.float()
    v_full = _expand_kv(seg.v, heads).float()
    dv = probs.transpose(-1, -2) @ dy32
    dprobs = dy32 @ v_full.transpose(-1, -2)
    delta = (dy32 * out.float()).sum(dim=-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dq = scale * (dscores @ _expand_kv(seg.k, heads).float())
    dk = scale * (dscores.transpose(-1, -2) @ seg.q.float())
    dpse = None if seg.pse is None else (scale * dscores).sum_to_size(seg.pse.shape)
    return dq, _reduce_kv(dk, kv_heads), _reduce_kv(dv, kv_heads), dpse


# --------------------------------------------------------------------------- stats layouts
def _pack_stats(per_segment: List[torch.Tensor], geometry: _Geometry, softmax_layout: str) -> torch.Tensor:
    """[B,N,S] (one segment) or per-sequence [1,N,s_b] blocks -> the op's 8-lane fp32 layout."""
    if geometry.layout != "TND":
        stat = per_segment[0]
        return stat.unsqueeze(-1).expand(*stat.shape, _STAT_LANES).contiguous()
    heads = geometry.head_num
    total = geometry.total_q
    if softmax_layout == "TND":  # truly token-major [T, N, 8]
        flat = torch.cat([s[0].transpose(0, 1) for s in per_segment], dim=0) if per_segment else torch.empty(0, heads)
    else:  # kernel default: per sequence an [N, s_b, 8] block, blocks in batch order (contract 1.7)
        flat = torch.cat([s[0].reshape(-1) for s in per_segment]) if per_segment else torch.empty(0)
    flat = _pad_rows(flat.reshape(-1, 1), total * heads).expand(-1, _STAT_LANES)
    return flat.reshape(total, heads, _STAT_LANES).contiguous()


def _unpack_stats(stat: torch.Tensor, geometry: _Geometry, softmax_layout: str, name: str) -> List[torch.Tensor]:
    """Inverse of `_pack_stats` using lane 0: list of [B,N,S] (dense) or [1,N,s_b] per sequence."""
    if stat is None:
        raise RuntimeError(f"npu_fusion_attention_grad needs {name} (the forward's output)")
    if stat.dtype != torch.float32 or stat.shape[-1] != _STAT_LANES:
        raise RuntimeError(
            f"{name} must be float32 with a last axis of {_STAT_LANES}, got {stat.dtype} {tuple(stat.shape)}")
    lane = stat[..., 0]
    if geometry.layout != "TND":
        return [lane]
    heads = geometry.head_num
    total = geometry.total_q
    if tuple(stat.shape) != (total, heads, _STAT_LANES):
        raise RuntimeError(f"{name} must have shape [T, N1, 8] = {[total, heads, 8]}, got {tuple(stat.shape)}")
    blocks = []
    if softmax_layout == "TND":
        for start, length in zip(geometry.starts_q, geometry.seq_q):
            blocks.append(lane[start:start + length].transpose(0, 1).unsqueeze(0))
    else:
        flat = lane.reshape(-1)
        for start, length in zip(geometry.starts_q, geometry.seq_q):
            blocks.append(flat[start * heads:(start + length) * heads].view(1, heads, length))
    return blocks


# ------------------------------------------------------------------------------ the op object
@dataclass
class _AttentionCall:
    """Everything that turns (query, key, value[, pse]) into segments, shared by fwd and grad."""

    geometry: _Geometry
    scale: float
    kept: List[Optional[torch.Tensor]]
    softmax_layout: str

    def segments(self, query, key, value, pse) -> List[_Segment]:
        g = self.geometry
        if g.layout != "TND":
            return [_Segment(_to_bnsd(query, g.layout, g.head_num), _to_bnsd(key, g.layout, g.kv_heads),
                             _to_bnsd(value, g.layout, g.kv_heads), self.kept[0], pse)]
        segments = []
        for b in range(g.batch):
            qs, ks = g.starts_q[b], g.starts_kv[b]
            segments.append(_Segment(
                query[qs:qs + g.seq_q[b]].transpose(0, 1).unsqueeze(0),
                key[ks:ks + g.seq_kv[b]].transpose(0, 1).unsqueeze(0),
                value[ks:ks + g.seq_kv[b]].transpose(0, 1).unsqueeze(0),
                self.kept[b], None,
            ))
        return segments

    def to_layout(self, per_segment: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Per-segment [B,N,S,D] results -> one tensor in the caller's layout and dtype."""
        if self.geometry.layout != "TND":
            return _from_bnsd(per_segment[0], self.geometry.layout).to(like.dtype)
        if not per_segment:
            return like.new_zeros(like.shape)
        rows = torch.cat([s[0].transpose(0, 1) for s in per_segment], dim=0).to(like.dtype)
        return _pad_rows(rows, like.shape[0])

    def forward(self, query, key, value, pse):
        outs, maxes, sums = [], [], []
        for seg in self.segments(query, key, value, pse):
            out, row_max, row_sum = _forward_segment(seg, self.scale)
            outs.append(out)
            maxes.append(row_max)
            sums.append(row_sum)
        return (self.to_layout(outs, query), _pack_stats(maxes, self.geometry, self.softmax_layout),
                _pack_stats(sums, self.geometry, self.softmax_layout))

    def backward(self, query, key, value, pse, dy, attention_in, softmax_max, softmax_sum):
        maxes = _unpack_stats(softmax_max, self.geometry, self.softmax_layout, "softmax_max")
        sums = _unpack_stats(softmax_sum, self.geometry, self.softmax_layout, "softmax_sum")
        segments = self.segments(query, key, value, pse)
        dy_segments = self.segments(dy, key, value, None)  # dy/out share query's layout and heads
        out_segments = self.segments(attention_in, key, value, None)
        grads = [_backward_segment(seg, dseg.q, oseg.q, m, l, self.scale)
                 for seg, dseg, oseg, m, l in zip(segments, dy_segments, out_segments, maxes, sums)]
        dq = self.to_layout([g[0] for g in grads], query)
        dk = self._kv_to_layout([g[1] for g in grads], key)
        dv = self._kv_to_layout([g[2] for g in grads], value)
        dpse = None if pse is None else grads[0][3].to(pse.dtype)
        return dq.to(query.dtype), dk.to(query.dtype), dv.to(query.dtype), dpse

    def _kv_to_layout(self, per_segment, like):
        g = self.geometry
        if g.layout != "TND":
            return _from_bnsd(per_segment[0], g.layout)
        if not per_segment:
            return like.new_zeros(like.shape)
        return _pad_rows(torch.cat([s[0].transpose(0, 1) for s in per_segment], dim=0), like.shape[0])


class _FusionAttentionAutograd(torch.autograd.Function):
    """Registers the grad op as the backward of output 0, like torch_npu's derivatives.yaml."""

    @staticmethod
    def forward(ctx, call: _AttentionCall, query, key, value, pse):
        out, softmax_max, softmax_sum = call.forward(query, key, value, pse)
        ctx.call = call
        ctx.save_for_backward(query, key, value, pse, out, softmax_max, softmax_sum)
        ctx.mark_non_differentiable(softmax_max, softmax_sum)
        return out, softmax_max, softmax_sum

    @staticmethod
    def backward(ctx, dout, _dmax, _dsum):
        query, key, value, pse, out, softmax_max, softmax_sum = ctx.saved_tensors
        dq, dk, dv, dpse = ctx.call.backward(query, key, value, pse, dout, out, softmax_max, softmax_sum)
        return None, dq, dk, dv, dpse


# ----------------------------------------------------------------------------- device module
class FakeNPUDeviceModule:
    """A `torch.npu` look-alike that runs on CPU (contract 4.1).

    Device indices are checked against `device_count`; seeds go to a CPU generator
    (`generator`); memory statistics are the host's peak resident set size (VmHWM), reset
    through /proc/self/clear_refs where the kernel allows it.
    """

    def __init__(self, device_count: int = 1):
        self._device_count = int(device_count)
        self._current = 0
        self.generator = torch.Generator()
        self.seed_calls: List[Tuple[str, int]] = []
        self.synchronize_calls = 0
        self.reset_calls = 0

    def is_available(self) -> bool:
        """True when at least one (fake) device exists."""
        return self._device_count > 0

    def device_count(self) -> int:
        """Number of visible (fake) devices."""
        return self._device_count

    def _index(self, device) -> int:
        if device is None:
            return self._current
        if isinstance(device, torch.device):
            index = device.index if device.index is not None else self._current
        elif isinstance(device, str):
            match = re.fullmatch(r"npu(?::(\d+))?", device)
            if match is None:
                raise RuntimeError(f"Invalid device string: {device!r} (expected 'npu' or 'npu:N')")
            index = int(match.group(1)) if match.group(1) is not None else self._current
        elif isinstance(device, int) and not isinstance(device, bool):
            index = device
        else:
            raise RuntimeError(f"Invalid device argument {device!r}")
        if not 0 <= index < self._device_count:
            raise RuntimeError(f"Invalid device ordinal {index}: {self._device_count} NPU device(s) visible")
        return index

    def set_device(self, device) -> None:
        """Bind this process to device `device` (int, 'npu:N' or torch.device)."""
        self._current = self._index(device)

    def current_device(self) -> int:
        """Index of the bound device."""
        return self._current

    def synchronize(self, device=None) -> None:
        """No queued work on CPU; validates the device argument and counts the call."""
        self._index(device)
        self.synchronize_calls += 1

    def manual_seed(self, seed: int) -> None:
        """Seed the (fake) current device's generator."""
        self.generator.manual_seed(int(seed))
        self.seed_calls.append(("manual_seed", int(seed)))

    def manual_seed_all(self, seed: int) -> None:
        """Seed every (fake) device's generator."""
        self.generator.manual_seed(int(seed))
        self.seed_calls.append(("manual_seed_all", int(seed)))

    def initial_seed(self) -> int:
        """The seed last given to the generator."""
        return self.generator.initial_seed()

    def max_memory_allocated(self, device=None) -> int:
        """Peak host resident bytes since the last reset (the CPU stand-in for device memory)."""
        self._index(device)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM missing from /proc/self/status")

    def reset_peak_memory_stats(self, device=None) -> None:
        """Start a new peak window (writes 5 to /proc/self/clear_refs; ignored where not allowed)."""
        self._index(device)
        self.reset_calls += 1
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")
        except OSError:
            pass  # NOTE: the peak then covers the whole process, an upper bound of the window


# ---------------------------------------------------------------------------------- module
class FakeTorchNPU:
    """Module-like CPU stand-in for `torch_npu` (see the module docstring)."""

    def __init__(self, release: str = "7.2.0", device_count: int = 1):
        self.release = release
        self._release = _release_tuple(release)
        if self._release < (6, 0, 0):
            raise ValueError(f"the fake emulates torch_npu releases >= 6.0.0 (varlen TND exists), got {release}")
        self.npu = FakeNPUDeviceModule(device_count)
        self.__version__ = f"fake-{release}"

    # ---------------------------------------------------------------- helpers
    def _gate(self, op: str, name: str, value, since: Tuple[int, int, int]):
        """Keywords a release does not have raise TypeError, as Python would for the real op."""
        if value is _UNSET:
            return None
        if self._release < since:
            raise TypeError(f"{op}() got an unexpected keyword argument '{name}' (added in torch_npu "
                            f"{'.'.join(map(str, since))}, emulating {self.release})")
        return value

    def _prepare(self, op, query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
                 keep_prob, pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                 sparse_mode, softmax_layout, sink) -> _AttentionCall:
        layout = str(input_layout).upper()
        _check_qkv(query, key, value, int(head_num), layout, keep_prob, int(sparse_mode))
        softmax_layout = "" if softmax_layout is None else softmax_layout
        if softmax_layout not in ("", "TND"):
            raise RuntimeError(f"softmax_layout must be '' or 'TND', got {softmax_layout!r}")
        if sink is not None:
            raise ValueError(f"{op}: sink is not modelled by the fake (its statistics semantics are undocumented)")
        if padding_mask is not None:
            raise ValueError(f"{op}: padding_mask is reserved and not supported by npu_fusion_attention")
        if inner_precise not in (0, 1, 2):
            raise RuntimeError(f"inner_precise must be 0, 1 or 2, got {inner_precise}")
        if layout != "TND" and (actual_seq_qlen is not None or actual_seq_kvlen is not None):
            raise RuntimeError(f"actual_seq_qlen/actual_seq_kvlen are only used with TND, got layout {layout}")
        geometry = _geometry(query, key, value, int(head_num), layout, actual_seq_qlen, actual_seq_kvlen)
        mode, pre, nxt = int(sparse_mode), int(pre_tockens), int(next_tockens)
        if mode in (7, 8) and pse is not None:
            raise RuntimeError(f"sparse_mode={mode} does not support pse")
        if layout == "TND":
            if pse is not None:
                raise ValueError(f"{op}: pse with TND is not modelled by the fake")
            kept = _varlen_kept(atten_mask, mode, geometry, pre, nxt, prefix)
        else:
            q4 = _to_bnsd(query, layout, geometry.head_num)
            k4 = _to_bnsd(key, layout, geometry.kv_heads)
            if pse is not None:
                try:
                    torch.broadcast_shapes(pse.shape, (q4.shape[0], q4.shape[1], q4.shape[2], k4.shape[2]))
                except RuntimeError as exc:
                    raise RuntimeError(f"pse {tuple(pse.shape)} does not broadcast to [B,N1,Sq,Skv]") from exc
            kept = [_dense_kept(atten_mask, mode, q4.shape[0], q4.shape[1], q4.shape[2], k4.shape[2], pre, nxt, prefix)]
        return _AttentionCall(geometry=geometry, scale=float(scale), kept=kept, softmax_layout=softmax_layout)

    # -------------------------------------------------------------- attention
    def npu_fusion_attention(self, query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=MAX_TOCKENS,
                             next_tockens=MAX_TOCKENS, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                             softmax_layout=_UNSET, sink=_UNSET, dropout_mask=_UNSET, seed=_UNSET,
                             offset=_UNSET):
        """FlashAttentionScore: (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels).

        Differentiable in query/key/value/pse through `npu_fusion_attention_grad`'s math.
        """
        op = "npu_fusion_attention"
        softmax_layout = self._gate(op, "softmax_layout", softmax_layout, (7, 2, 0))
        sink = self._gate(op, "sink", sink, (7, 3, 0))
        for name, value_ in (("dropout_mask", dropout_mask), ("seed", seed), ("offset", offset)):
            if self._gate(op, name, value_, (26, 0, 0)) not in (None, 0):
                raise ValueError(f"{op}: {name} only matters with dropout, which the fake does not model")
        call = self._prepare(op, query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
                             keep_prob, pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen,
                             actual_seq_kvlen, sparse_mode, softmax_layout, sink)
        out, softmax_max, softmax_sum = _FusionAttentionAutograd.apply(call, query, key, value, pse)
        numels = _numels(query, key, call.geometry, actual_seq_qlen, actual_seq_kvlen)
        softmax_out = torch.empty(0, dtype=query.dtype)
        return out, softmax_max, softmax_sum, softmax_out, 0, 0, numels

    def npu_fusion_attention_grad(self, query, key, value, dy, head_num, input_layout, *, pse=None,
                                  padding_mask=None, atten_mask=None, softmax_max=None, softmax_sum=None,
                                  softmax_in=None, attention_in=None, scale_value=1.0, keep_prob=1.0,
                                  pre_tockens=MAX_TOCKENS, next_tockens=MAX_TOCKENS, inner_precise=0, seed=0,
                                  offset=0, numels=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                                  sparse_mode=0, gen_mask_parallel=True, sync=False, softmax_layout=_UNSET,
                                  sink=_UNSET):
        """(dq, dk, dv, dpse[, dsink]) from the GIVEN softmax_max/softmax_sum/attention_in (contract 2)."""
        op = "npu_fusion_attention_grad"
        softmax_layout = self._gate(op, "softmax_layout", softmax_layout, (7, 2, 0))
        sink = self._gate(op, "sink", sink, (7, 3, 0))
        if dy.dim() not in (3, 4):
            raise RuntimeError(
                f"The shapes of the input dy should be 3 or 4 dimensional, but got {dy.dim()}-dimensional")
        call = self._prepare(op, query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                             scale_value, keep_prob, pre_tockens, next_tockens, inner_precise, prefix,
                             actual_seq_qlen, actual_seq_kvlen, sparse_mode, softmax_layout, sink)
        if attention_in is None:
            raise RuntimeError("npu_fusion_attention_grad needs attention_in (the forward's attention_out)")
        if call.geometry.layout in ("BSH", "SBH"):  # H of the output = N1 * Dv
            out_shape = tuple(query.shape[:-1]) + (call.geometry.head_num * value.shape[-1] // call.geometry.kv_heads,)
        else:
            out_shape = tuple(query.shape[:-1]) + (value.shape[-1],)
        for name, tensor in (("dy", dy), ("attention_in", attention_in)):
            if tuple(tensor.shape) != out_shape:
                raise RuntimeError(
                    f"{name} must have attention_out's shape {list(out_shape)}, got {tuple(tensor.shape)}")
        if call.geometry.layout != "TND":
            q4 = _to_bnsd(query, call.geometry.layout, call.geometry.head_num)
            stat_shape = (q4.shape[0], call.geometry.head_num, q4.shape[2], _STAT_LANES)
            for name, stat in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
                if stat is not None and tuple(stat.shape) != stat_shape:
                    raise RuntimeError(
                        f"{name} must have shape [B, N1, Sq, 8] = {list(stat_shape)}, got {tuple(stat.shape)}")
        with torch.no_grad():
            dq, dk, dv, dpse = call.backward(query, key, value, pse, dy, attention_in, softmax_max, softmax_sum)
        if self._release >= (7, 3, 0):
            return dq, dk, dv, dpse, torch.empty(0, dtype=torch.float32)
        return dq, dk, dv, dpse

    # ----------------------------------------------------------- fused layers
    def npu_rms_norm(self, x, gamma, epsilon: float = 1e-6):
        """(y, rstd): normalise over the last gamma.dim() axes; rstd fp32 with keep-dims shape (contract 3.1)."""
        if not 2 <= x.dim() <= 8:
            raise RuntimeError(f"npu_rms_norm: x must have 2 to 8 dims, got {x.dim()}")
        allowed_gamma = {torch.float16: (torch.float16, torch.float32), torch.bfloat16: (torch.bfloat16, torch.float32),
                         torch.float32: (torch.float32,)}
        if gamma.dtype not in allowed_gamma.get(x.dtype, ()):
            raise RuntimeError(f"npu_rms_norm: unsupported dtype pair x {x.dtype}, gamma {gamma.dtype}")
        axes = tuple(range(x.dim() - gamma.dim(), x.dim()))
        if gamma.dim() == 0 or gamma.dim() > x.dim() or tuple(x.shape[-gamma.dim():]) != tuple(gamma.shape):
            raise RuntimeError(
                f"npu_rms_norm: gamma {tuple(gamma.shape)} must equal the trailing dims of x {tuple(x.shape)}")
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(dim=axes, keepdim=True) + epsilon)
        y = (x32 * rstd * gamma.float()).to(x.dtype)
        return y, rstd.detach()

    def npu_rotary_mul(self, x, r1, r2, rotary_mode: str = "half", rotate=_UNSET):
        """x * r1 + rot(x) * r2 with rot = half (cat(-x2, x1)) or interleave pairs (contract 3.2)."""
        if self._release < (7, 0, 0) and rotary_mode != "half":
            raise TypeError(f"npu_rotary_mul() has no rotary_mode before 7.0.0 (emulating {self.release})")
        rotate = self._gate("npu_rotary_mul", "rotate", rotate, (26, 0, 0))
        if rotary_mode not in ("half", "interleave"):
            raise RuntimeError(f"npu_rotary_mul: rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
        # contract 3.2: 4-D only up to 7.2.0 (the CANN tiling rejects other ranks); 3-D from 7.3.0
        ranks = (3, 4) if self._release >= (7, 3, 0) else (4,)
        if x.dim() not in ranks:
            raise RuntimeError(f"npu_rotary_mul: x must be {' or '.join(f'{r}-D' for r in ranks)} on torch_npu "
                               f"{self.release}, got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES or r1.dtype not in _FLOAT_DTYPES or r2.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(f"npu_rotary_mul: x, r1, r2 must be float16/bfloat16/float32, got "
                               f"{x.dtype}/{r1.dtype}/{r2.dtype}")
        # the wrapper casts r1/r2 to x's dtype itself (mixed dtypes accepted), so the product is
        # formed from cos/sin rounded to x's dtype
        r1, r2 = r1.to(x.dtype), r2.to(x.dtype)
        dim = x.shape[-1]
        if dim % 2 or dim >= 896:
            raise RuntimeError(f"npu_rotary_mul: the last dim must be even and < 896, got {dim}")
        if r1.shape != r2.shape or r1.dim() != x.dim() or r1.shape[-1] != dim:
            raise RuntimeError(f"npu_rotary_mul: r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} must have x's rank "
                               f"and last dim ({tuple(x.shape)})")
        lead = tuple(x.shape[:-1])
        if x.dim() == 4:
            a, b, c = lead
            patterns = {"half": {(1, 1, c), (a, 1, c), (a, b, c), (1, b, 1), (a, b, 1), (a, 1, 1)},
                        "interleave": {(1, 1, c), (1, b, 1), (a, 1, 1)}}
        else:
            t, n = lead
            patterns = {"half": {(t, 1), (t, n)}, "interleave": {(t, 1)}}
        if tuple(r1.shape[:-1]) not in patterns[rotary_mode]:
            raise RuntimeError(f"npu_rotary_mul ({rotary_mode}): r1/r2 shape {tuple(r1.shape)} is not a supported "
                               f"broadcast of x {tuple(x.shape)} "
                               f"(allowed leading dims {sorted(patterns[rotary_mode])})")
        x32 = x.float()
        if rotate is not None:
            rotated = x32 @ rotate.detach().float()
        elif rotary_mode == "half":
            first, second = x32.chunk(2, dim=-1)
            rotated = torch.cat([-second, first], dim=-1)
        else:
            pairs = x32.unflatten(-1, (dim // 2, 2))
            rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (x32 * r1.float() + rotated * r2.float()).to(x.dtype)

    def npu_swiglu(self, x, dim: int = -1):
        """silu(first half) * second half along `dim` (gate first, contract 3.3)."""
        if x.numel() == 0 or not 1 <= x.dim() <= 8:
            raise RuntimeError(f"npu_swiglu: input must be non-empty with 1 to 8 dims, got shape {tuple(x.shape)}")
        if not x.is_contiguous():
            raise RuntimeError("npu_swiglu: input must be contiguous")
        if x.shape[dim] % 2:
            raise RuntimeError(f"npu_swiglu: size {x.shape[dim]} along dim {dim} must be even")
        if x.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(f"npu_swiglu: unsupported dtype {x.dtype}")
        gate, up = x.float().chunk(2, dim=dim)
        return (F.silu(gate) * up).to(x.dtype)


def compressed_causal_mask() -> torch.Tensor:
    """A fresh copy of the [2048, 2048] bool mask that sparse modes 2/3/4/7/8 expect (for tests)."""
    return _expected_compressed(COMPRESSED_MASK_SIZE).clone()


__all__ = ["COMPRESSED_MASK_SIZE", "MAX_TOCKENS", "FakeNPUDeviceModule", "FakeTorchNPU", "compressed_causal_mask"]
