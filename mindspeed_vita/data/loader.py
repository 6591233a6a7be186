"""The training data pipeline: mixture shard -> read -> parse -> render (workers) -> pack.

Reading, parsing and rendering of stream position k is a pure function of k, run by a torch
`DataLoader` over an index dataset (map-style, so results come back in order for any number
of workers). Packing runs in the main process in stream order. The output therefore depends on
nothing but the mixture, the seed and the functions given: identical for num_workers 0, 1, 2...

A sample that raises `DataError` anywhere (read, parse, render) is skipped, counted under its
reason and logged with its file:line, or, with `strict=True`, raised. Any other exception is a
bug, not data, and propagates with the record's location attached.

Resumption: `state_dict()` holds the number of shard positions consumed and the packer's state
(the positions it holds); `load_state_dict()` re-renders those few positions, so the resumed
pipeline yields exactly the batches the uninterrupted one would have.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

from torch.utils.data import DataLoader, Dataset, Sampler

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.mixture import MixtureConfig, MixtureShard, MixtureStream, RawRecord
from mindspeed_vita.data.packing import Packer, packer_for, stack_rows
from mindspeed_vita.data.types import PackedBatch, RenderedSample, Sample

_STATE_VERSION = 1


def parse_record(raw: RawRecord) -> Sample:
    """Default `parse_fn`: `records.parse_line` on a `RawRecord` (media files checked)."""
    from mindspeed_vita.data.records import parse_line

    return parse_line(raw.text, source=raw.source, root=raw.root, path=raw.path, line=raw.line)


@dataclass
class _Fetched:
    position: int
    sample: Optional[RenderedSample]
    rejection: Optional[DataError]  # addressed to the record's file:line


class _RecordDataset(Dataset):
    """Shard position -> rendered sample (or the rejection); runs inside loader workers."""

    def __init__(self, shard: MixtureShard, read_fn, parse_fn, render_fn):
        self.shard = shard
        self.read_fn = read_fn
        self.parse_fn = parse_fn
        self.render_fn = render_fn

    def __getitem__(self, position: int) -> _Fetched:
        item = self.shard.item(position)
        raw = None
        try:
            raw = self.read_fn(item.source_idx, item.line_idx)
            rendered = self.render_fn(self.parse_fn(raw))
        except DataError as error:
            if raw is not None and (error.path != raw.path or error.line != raw.line):
                error = error.at(raw.path, raw.line)  # e.g. an image error: point at the record
            return _Fetched(position, None, error)
        except Exception as error:
            where = (f"{raw.path}:{raw.line}" if raw is not None
                     else f"source {item.source_idx} record {item.line_idx}")
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"while loading {where} (shard position {position})")
            raise
        return _Fetched(position, rendered, None)


class _PositionsFrom(Sampler):
    """start, start+1, ... forever."""

    def __init__(self, start: int):
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            yield position
            position += 1


def _as_is(fetched: _Fetched) -> _Fetched:
    return fetched


class DataPipeline:
    """Endless iterator of `PackedBatch` for one data-parallel rank.

    Args:
        mixture_stream: a `MixtureStream` (sharded here by dp_rank / dp_size).
        read_fn: `(source_idx, line_idx) -> RawRecord` (usually `mixture_stream.read`).
        parse_fn: `RawRecord -> Sample` (usually `parse_record`).
        render_fn: `Sample -> RenderedSample`; must be deterministic (no RNG).
        packer: the `Packer`, owned by this pipeline from now on.
        dp_rank, dp_size: data-parallel coordinates; shards are disjoint and cover the stream.
        num_workers: loader processes for read/parse/render (0 = in this process).
        prefetch: samples prepared ahead per worker.
        strict: raise the first `DataError` instead of skipping the sample.
        logger: where skipped samples are reported (default: this module's logger).
        micro_batch_size: packed rows stacked into one batch ([b, s]).
        max_consecutive_rejects: fail after this many rejected samples in a row (a broken
            mixture or renderer would otherwise spin forever without output).
    """

    def __init__(self, mixture_stream, read_fn: Callable[[int, int], Any], parse_fn: Callable[[Any], Any],
                 render_fn: Callable[[Any], RenderedSample], packer: Packer, *, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, prefetch: int = 2, strict: bool = False,
                 logger: Optional[logging.Logger] = None, micro_batch_size: int = 1,
                 max_consecutive_rejects: int = 10000):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.shard = mixture_stream.shard(dp_rank, dp_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.packer = packer
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.strict = bool(strict)
        self.logger = logger or logging.getLogger(__name__)
        self.micro_batch_size = int(micro_batch_size)
        self.max_consecutive_rejects = int(max_consecutive_rejects)
        self._dataset = _RecordDataset(self.shard, read_fn, parse_fn, render_fn)
        #: shard positions consumed (handed to the packer or rejected)
        self.consumed = 0
        #: rejected samples per `DataError.reason`
        self.rejected: Counter = Counter()
        self._consecutive_rejects = 0

    # -------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[PackedBatch]:
        """Batches from the current state on; breaking out and iterating again continues
        where the last yielded batch left off."""
        yield from self._drain()
        loader = DataLoader(
            self._dataset,
            batch_size=None,
            sampler=_PositionsFrom(self.consumed),
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch if self.num_workers else None,
            collate_fn=_as_is,
        )
        for fetched in loader:
            if fetched.position != self.consumed:  # the sampler and dataset guarantee this
                raise RuntimeError(f"loader returned position {fetched.position}, expected {self.consumed}")
            self.consumed += 1
            if fetched.rejection is not None:
                self._reject(fetched.rejection)
            else:
                self._consecutive_rejects = 0
                self.packer.add(fetched.position, fetched.sample)
            yield from self._drain()

    def _drain(self) -> Iterator[PackedBatch]:
        while len(self.packer) >= self.micro_batch_size:
            yield stack_rows([self.packer.pop() for _ in range(self.micro_batch_size)])

    def _reject(self, error: DataError) -> None:
        if self.strict:
            raise error
        self.rejected[error.reason] += 1
        self._consecutive_rejects += 1
        self.logger.warning("skipped sample (%s): %s", error.reason, error)
        if self._consecutive_rejects >= self.max_consecutive_rejects:
            raise RuntimeError(f"{self._consecutive_rejects} samples in a row were rejected "
                               f"(last: {error}); counts so far: {dict(self.rejected)}")

    # ---------------------------------------------------------------------------- metrics
    def stats(self) -> Dict[str, Any]:
        """Consumed positions, rejections per reason and the packing counters."""
        return {"consumed": self.consumed, "rejected": dict(self.rejected), **self.packer.stats.as_dict()}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly after the last yielded batch."""
        return {
            "version": _STATE_VERSION,
            "stream": self.shard.fingerprint(),
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "micro_batch_size": self.micro_batch_size,
            "consumed": self.consumed,
            "rejected": dict(self.rejected),
            "packer": self.packer.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore `state_dict()`; the mixture, seed, shard and packer settings must match."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data pipeline state version {state.get('version')!r}, expected {_STATE_VERSION}")
        expected = {"stream": self.shard.fingerprint(), "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                    "micro_batch_size": self.micro_batch_size}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"data pipeline state has {key}={state.get(key)!r} but this pipeline has "
                                 f"{key}={value!r} (different mixture, seed or layout?)")
        self.packer.load_state_dict(state["packer"], fetch=self._refetch)
        self.consumed = int(state["consumed"])
        self.rejected = Counter(state["rejected"])
        self._consecutive_rejects = 0

    def _refetch(self, position: int) -> RenderedSample:
        fetched = self._dataset[position]
        if fetched.sample is None:
            raise ValueError(f"shard position {position} was packed before the checkpoint but is rejected "
                             f"now ({fetched.rejection}): did the data change?")
        return fetched.sample


def pipeline_from_config(stage, *, render_fn: Callable[[Sample], RenderedSample], pad_id: int,
                         context_token_ids: Iterable[int] = (), dp_rank: int = 0, dp_size: int = 1,
                         parse_fn: Callable[[RawRecord], Sample] = parse_record,
                         logger: Optional[logging.Logger] = None, cache_dir: Optional[str] = None,
                         layout=None, order=None) -> DataPipeline:
    """The pipeline a `StageConfig` describes (data.*, parallel.*, training.micro_batch_size).

    `render_fn` binds the tokenizer and limits (e.g. a `functools.partial` of the renderer);
    `pad_id` and `context_token_ids` come from the same tokenizer. `layout` is the run's
    `ParallelLayout` (default: the stage's, without a world size); rows are a multiple of its
    `seq_multiple` and reset-mode samples of its `segment_multiple` (`packing.packer_for`).
    `order`: a `stream_order.StreamOrder` the dp ranks divide instead of the plain stream (a run
    resumed at another dp size continues the old run's order with it).
    """
    from mindspeed_vita.parallel.layout import ParallelLayout

    data = stage.data
    if not data.mixture:
        raise ValueError("config key 'data.mixture' is not set: the stage has no data mixture")
    if layout is None:
        layout = ParallelLayout.from_config(stage.parallel, world_size=None)
    stream = MixtureStream(MixtureConfig.from_yaml(data.mixture), seed=data.seed, cache_dir=cache_dir)
    source = stream
    if order is not None and not order.plain:
        from mindspeed_vita.data.stream_order import OrderedStream

        source = OrderedStream(stream, order)
    packer = packer_for(layout, data, pad_id=pad_id, context_token_ids=context_token_ids,
                        tokens_per_unit=stage.model.tokens_per_tile)
    return DataPipeline(source, stream.read, parse_fn, render_fn, packer, dp_rank=dp_rank, dp_size=dp_size,
                        num_workers=data.num_workers, prefetch=data.prefetch, strict=data.strict, logger=logger,
                        micro_batch_size=stage.training.micro_batch_size)
