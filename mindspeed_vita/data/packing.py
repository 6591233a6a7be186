"""Greedy packing of rendered samples into fixed-length rows (`PackedBatch`, one row each).

Samples arrive in stream order with their stream position. A small window of `lookahead`
pending samples feeds the open row: each step places the largest window sample that still
fits (ties: the earliest), a new row always starts with the oldest pending sample (so no
sample waits more than about one row), and a row is closed when nothing in the window fits.
`lookahead=1` is plain sequential next-fit. Everything is a pure function of the input order,
and the whole state (finished-but-unread rows, the open row, the window) is a list of stream
positions: `state_dict()` is small, and `load_state_dict()` rebuilds it exactly by asking for
those positions again (rendering is deterministic).

Modes (docs/long-vita.md, section 3, the stage table):
* ``reset`` (stages 1-2): each sample is its own attention segment; it is padded to a multiple
  of `segment_multiple` (`packer_for` takes it from `ParallelLayout.segment_multiple`, 2*cp, so
  zigzag context parallelism can split every sample: docs/architecture.md, "Why the zigzag
  split"); positions restart at 0 per segment; the row's tail padding is a final segment of its
  own; `cu_seqlens` = int32 boundaries with a leading 0.
* ``joint`` (stages 3-4): samples are laid back to back and attend across; positions run
  0..seq_length-1 over the row; `cu_seqlens` is None.
Padding tokens are `pad_id` with label -100. A sample longer than a row is dropped, or with
``on_overlong="truncate"`` cut to the row (never inside a visual unit: the cut moves back to
the start of a unit whose context tokens would not all fit, and the unit's pixels go too).
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Deque, Dict, Iterable, List, Optional

import torch

from mindspeed_vita.data.types import IGNORE_INDEX, PackedBatch, RenderedSample

if TYPE_CHECKING:
    from mindspeed_vita.config.schema import DataConfig
    from mindspeed_vita.parallel.layout import ParallelLayout

PACKING_MODES = ("reset", "joint")
OVERLONG_POLICIES = ("drop", "truncate")
_STATE_VERSION = 1


def packer_for(layout: "ParallelLayout", data: "DataConfig", *, pad_id: int,
               context_token_ids: Iterable[int] = (), tokens_per_unit: int = 256,
               packer_class: Optional[type] = None) -> "Packer":
    """The packer of a stage: `data.*` settings, rows a multiple of `layout.seq_multiple` and,
    in reset mode, every sample padded to `layout.segment_multiple` (2 * cp), so context
    parallelism can always split a packed sample. `packer_class` (a `Packer` subclass) lets
    tools instrument it. The multiples come from the layout only; ConfigError when the row
    length does not fit them."""
    layout.check_seq_length(data.seq_length)
    segment = layout.segment_multiple if data.packing == "reset" else None
    if segment is not None:
        layout.check_segment_multiple(segment)
    return (packer_class or Packer)(
        data.seq_length, mode=data.packing, pad_multiple=layout.seq_multiple,
        segment_multiple=segment, pad_id=pad_id, on_overlong=data.on_overlong,
        lookahead=data.pack_lookahead, context_token_ids=context_token_ids,
        tokens_per_unit=tokens_per_unit)


@dataclass
class PackingStats:
    """Counters of one packer; utilisation = real tokens / slots of the finished rows."""

    rows: int = 0  # finished rows
    samples: int = 0  # samples placed in finished rows
    dropped_overlong: int = 0  # samples longer than a row that were dropped
    truncated_overlong: int = 0  # samples longer than a row that were cut to fit
    real_tokens: int = 0  # sample tokens in finished rows (no padding)
    slots: int = 0  # rows * seq_length

    @property
    def utilisation(self) -> float:
        """Fraction of row slots holding real tokens (0.0 before the first row)."""
        return self.real_tokens / self.slots if self.slots else 0.0

    def as_dict(self) -> Dict[str, float]:
        """Counters plus utilisation, for logs and metrics."""
        return {**asdict(self), "utilisation": self.utilisation}


@dataclass
class _Entry:
    position: int
    sample: RenderedSample
    slots: int  # tokens it occupies in a row (its length, padded to segment_multiple in reset)


class Packer:
    """Packs `RenderedSample`s into fixed-length rows; see the module docstring.

    Args:
        seq_length: tokens per row; a multiple of `pad_multiple`.
        mode: "reset" or "joint".
        pad_multiple: what the row length is a multiple of (`ParallelLayout.seq_multiple`).
        pad_id: token id of padding.
        on_overlong: "drop" or "truncate" for samples longer than a row.
        lookahead: window size of the best-fit choice (1 = sequential next-fit).
        segment_multiple: reset mode only: every sample segment is padded to this multiple
            (default `pad_multiple`; zigzag CP needs a multiple of 2*cp, see `packer_for`).
        context_token_ids: ids of visual context tokens (`VitaTokenizer.context_token_ids`);
            needed to truncate samples that carry pixels.
        tokens_per_unit: context tokens per visual unit (256 at full size).
    """

    def __init__(self, seq_length: int, *, mode: str = "reset", pad_multiple: int = 1, pad_id: int = 0,
                 on_overlong: str = "drop", lookahead: int = 8, segment_multiple: Optional[int] = None,
                 context_token_ids: Iterable[int] = (), tokens_per_unit: int = 256):
        if mode not in PACKING_MODES:
            raise ValueError(f"mode must be one of {PACKING_MODES}, got {mode!r}")
        if on_overlong not in OVERLONG_POLICIES:
            raise ValueError(f"on_overlong must be one of {OVERLONG_POLICIES}, got {on_overlong!r}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        if seq_length < 1 or seq_length % pad_multiple:
            raise ValueError(f"seq_length ({seq_length}) must be a positive multiple of "
                             f"pad_multiple ({pad_multiple})")
        if segment_multiple is None:
            segment_multiple = pad_multiple if mode == "reset" else 1
        if mode == "joint" and segment_multiple != 1:
            raise ValueError(f"segment_multiple ({segment_multiple}) applies to mode 'reset' only")
        if segment_multiple < 1 or seq_length % segment_multiple:
            raise ValueError(f"seq_length ({seq_length}) must be a multiple of segment_multiple ({segment_multiple})")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        if tokens_per_unit < 1:
            raise ValueError(f"tokens_per_unit must be >= 1, got {tokens_per_unit}")
        self.seq_length = int(seq_length)
        self.mode = mode
        self.pad_multiple = int(pad_multiple)
        self.segment_multiple = int(segment_multiple)
        self.pad_id = int(pad_id)
        self.on_overlong = on_overlong
        self.lookahead = int(lookahead)
        self.context_token_ids = sorted(int(i) for i in context_token_ids)
        self.tokens_per_unit = int(tokens_per_unit)
        self.stats = PackingStats()
        self._ready: Deque[tuple] = deque()  # (positions, PackedBatch) of finished rows
        self._row: List[_Entry] = []
        self._row_free = self.seq_length
        self._window: List[_Entry] = []

    # ------------------------------------------------------------------------- feeding
    def add(self, position: int, sample: RenderedSample) -> None:
        """Take the sample at stream `position` (samples arrive in stream order; the position
        only names the sample in `state_dict()`); rows this completes become available from
        `pop()`. An overlong sample is dropped or truncated here and counted."""
        entry = self._admit(position, sample, count=True)
        if entry is None:
            return
        self._window.append(entry)
        while len(self._window) >= self.lookahead:
            self._place_one()

    def flush(self) -> None:
        """Place every pending sample and finish the open row (end of a finite stream)."""
        while self._window:
            self._place_one()
        if self._row:
            self._finish_row()

    def pop(self) -> Optional[PackedBatch]:
        """The oldest finished row, or None."""
        return self._ready.popleft()[1] if self._ready else None

    def __len__(self) -> int:
        """Number of finished rows waiting in `pop()`."""
        return len(self._ready)

    # -------------------------------------------------------------------------- internals
    def _admit(self, position: int, sample: RenderedSample, *, count: bool) -> Optional[_Entry]:
        length = sample.num_tokens
        if length == 0:
            raise ValueError(f"{sample.source}:{sample.line}: rendered sample has no tokens")
        if tuple(sample.labels.shape) != tuple(sample.input_ids.shape):
            raise ValueError(f"{sample.source}:{sample.line}: labels shape {tuple(sample.labels.shape)} "
                             f"!= input_ids shape {tuple(sample.input_ids.shape)}")
        if self._slots(length) > self.seq_length:
            if self.on_overlong == "drop":
                if count:
                    self.stats.dropped_overlong += 1
                return None
            sample = self._truncate(sample)
            if sample.num_tokens == 0:  # the first visual unit alone is longer than a row
                if count:
                    self.stats.dropped_overlong += 1
                return None
            if count:
                self.stats.truncated_overlong += 1
        return _Entry(int(position), sample, self._slots(sample.num_tokens))

    def _slots(self, length: int) -> int:
        multiple = self.segment_multiple
        return -(-length // multiple) * multiple

    def _truncate(self, sample: RenderedSample) -> RenderedSample:
        keep = self.seq_length
        pixels = sample.pixel_values
        n_units = int(pixels.shape[0]) if pixels.dim() else 0
        if n_units:
            if not self.context_token_ids:
                raise ValueError(f"{sample.source}:{sample.line}: truncating a sample with pixels needs "
                                 "context_token_ids (on_overlong='truncate')")
            is_context = torch.isin(sample.input_ids, torch.tensor(self.context_token_ids))
            context_positions = torch.nonzero(is_context).flatten()
            if context_positions.numel() != n_units * self.tokens_per_unit:
                raise ValueError(f"{sample.source}:{sample.line}: {context_positions.numel()} context tokens "
                                 f"but {n_units} visual units x {self.tokens_per_unit}")
            units_kept = int((context_positions < keep).sum()) // self.tokens_per_unit
            if units_kept < n_units:
                # cut before the first context token of the first unit that does not fit whole
                keep = min(keep, int(context_positions[units_kept * self.tokens_per_unit]))
            pixels = pixels[:units_kept]
        return RenderedSample(source=sample.source, line=sample.line, input_ids=sample.input_ids[:keep],
                              labels=sample.labels[:keep], pixel_values=pixels)

    def _place_one(self) -> None:
        if not self._row:
            # a new row starts with the oldest pending sample: bounded delay for every sample
            self._append(self._window.pop(0))
            return
        best = None
        for index, entry in enumerate(self._window):
            if entry.slots <= self._row_free and (best is None or entry.slots > self._window[best].slots):
                best = index
        if best is None:
            self._finish_row()
            self._append(self._window.pop(0))
        else:
            self._append(self._window.pop(best))

    def _append(self, entry: _Entry) -> None:
        self._row.append(entry)
        self._row_free -= entry.slots
        if self._row_free == 0:
            self._finish_row()

    def _finish_row(self) -> None:
        batch = self._build_row(self._row)
        self._ready.append(([e.position for e in self._row], batch))
        self.stats.rows += 1
        self.stats.samples += len(self._row)
        self.stats.real_tokens += batch.num_real_tokens
        self.stats.slots += self.seq_length
        self._row = []
        self._row_free = self.seq_length

    def _build_row(self, entries: List[_Entry]) -> PackedBatch:
        s = self.seq_length
        tokens = torch.full((s,), self.pad_id, dtype=torch.int64)
        labels = torch.full((s,), IGNORE_INDEX, dtype=torch.int64)
        positions = torch.empty(s, dtype=torch.int64)
        boundaries = [0]
        offset = 0
        for entry in entries:
            length = entry.sample.num_tokens
            tokens[offset:offset + length] = entry.sample.input_ids
            labels[offset:offset + length] = entry.sample.labels
            # the segment's own padding continues its positions: it sits after the real tokens,
            # so causal attention keeps it invisible to them
            positions[offset:offset + entry.slots] = torch.arange(entry.slots)
            offset += entry.slots
            boundaries.append(offset)
        if offset < s:
            positions[offset:] = torch.arange(s - offset)
            boundaries.append(s)
        if self.mode == "joint":
            positions = torch.arange(s, dtype=torch.int64)
            cu_seqlens = None
        else:
            cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
        return PackedBatch(
            tokens=tokens.unsqueeze(0),
            labels=labels.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            pixel_values=_concat_pixels([e.sample.pixel_values for e in entries]),
            cu_seqlens=cu_seqlens,
            samples=[(e.sample.source, e.sample.line) for e in entries],
            num_real_tokens=sum(e.sample.num_tokens for e in entries),
        )

    # ------------------------------------------------------------------------------ state
    def _config(self) -> Dict[str, object]:
        return dict(seq_length=self.seq_length, mode=self.mode, pad_multiple=self.pad_multiple,
                    segment_multiple=self.segment_multiple, pad_id=self.pad_id,
                    on_overlong=self.on_overlong, lookahead=self.lookahead)

    def state_dict(self) -> Dict[str, object]:
        """Positions of every sample the packer holds, in order, plus counters and settings."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "ready": [list(positions) for positions, _ in self._ready],
            "row": [e.position for e in self._row],
            "window": [e.position for e in self._window],
            "stats": {k: v for k, v in self.stats.as_dict().items() if k != "utilisation"},
        }

    def held_positions(self) -> List[int]:
        """Stream positions of all samples held (finished-unread rows, open row, window)."""
        state = self.state_dict()
        return [p for row in state["ready"] for p in row] + state["row"] + state["window"]

    def load_state_dict(self, state: Dict[str, object], fetch: Callable[[int], RenderedSample]) -> None:
        """Restore from `state_dict()`; `fetch(position)` must return the same rendered sample
        that position gave before (overlong handling is re-applied, counters are not)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"packer state version {state.get('version')!r}, expected {_STATE_VERSION}")
        for key, value in self._config().items():
            if state["config"].get(key) != value:
                raise ValueError(f"packer state was saved with {key}={state['config'].get(key)!r}, "
                                 f"this packer has {key}={value!r}")

        def entry(position: int) -> _Entry:
            restored = self._admit(position, fetch(position), count=False)
            if restored is None:
                raise ValueError(f"stream position {position} is held by the saved packer state but is "
                                 "overlong now: did the data or the rendering change?")
            return restored

        self._ready = deque()
        for positions in state["ready"]:
            entries = [entry(p) for p in positions]
            self._ready.append((list(positions), self._build_row(entries)))
        self._row = [entry(p) for p in state["row"]]
        self._row_free = self.seq_length - sum(e.slots for e in self._row)
        if self._row_free < 0:
            raise ValueError("saved open row does not fit in seq_length")
        self._window = [entry(p) for p in state["window"]]
        self.stats = PackingStats(**state["stats"])


def _concat_pixels(parts: List[torch.Tensor]) -> torch.Tensor:
    """Visual units of the samples of a row, in order; empty parts are skipped."""
    non_empty = [p for p in parts if p.numel()]
    # NOTE: a text-only row keeps the (empty) tensor of its first sample, shape and dtype included
    return torch.cat(non_empty, dim=0) if non_empty else parts[0]


def stack_rows(rows: List[PackedBatch]) -> PackedBatch:
    """Stack single-row batches into one [b, s] batch; reset-mode `cu_seqlens` are re-based
    onto the flattened b*s tokens (each row's boundaries shifted by row * s)."""
    if len(rows) == 1:
        return rows[0]
    seq_length = rows[0].tokens.shape[1]
    cu_seqlens = None
    if rows[0].cu_seqlens is not None:
        parts = [rows[0].cu_seqlens] + [row.cu_seqlens[1:] + index * seq_length
                                         for index, row in enumerate(rows) if index]
        cu_seqlens = torch.cat(parts).to(torch.int32)
    non_empty = [row.pixel_values for row in rows if row.pixel_values.numel()]
    return PackedBatch(
        tokens=torch.cat([row.tokens for row in rows]),
        labels=torch.cat([row.labels for row in rows]),
        position_ids=torch.cat([row.position_ids for row in rows]),
        pixel_values=torch.cat(non_empty) if non_empty else rows[0].pixel_values,
        cu_seqlens=cu_seqlens,
        samples=[s for row in rows for s in row.samples],
        num_real_tokens=sum(row.num_real_tokens for row in rows),
    )
