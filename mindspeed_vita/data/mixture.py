"""The data mixture of a stage: which JSONL sources, how much of each, in what order.

A mixture YAML lists sources::

    sources:
      - name: llava-recap          # unique, used in logs and counters
        path: llava_recap.jsonl    # JSONL or JSON-array file, relative to this YAML's directory
        root: images/llava_recap   # media root (default: the JSONL's directory)
        paths: relative_to_root    # or as_written: media paths as in the file (absolute, or
                                   # relative to the working directory, as the release reads them)
        ratio: 1.0                 # use int(len * ratio) records, wrapping around if > 1
        num: 100000                # optional cap on that count

The Long-VITA release's mixture YAML (``dataset: {NAME: {ratio, num, data_paths: [...]}}``) is
accepted as well (`release_mixture`): each data path becomes one source with the entry's ratio
and cap (the release applies them per file), read with paths as written.

`MixtureStream` turns it into one deterministic, endless, random-access order of
`(source_idx, line_idx)` items: epoch after epoch, each a pseudo-random permutation of the
concatenated per-source selections. Nothing per item is stored: a keyed Feistel permutation
(a bijection on [0, n) computed on demand) gives both the global order and which records a
fractional ratio selects, so the memory cost is O(number of sources), whatever the item count.
"""
from __future__ import annotations

import abc
import hashlib
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Literal, NamedTuple, Optional, Sequence

import numpy as np
import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from mindspeed_vita.config.base import Section
from mindspeed_vita.data.source_index import open_source
from mindspeed_vita.errors import UserInputError

# ------------------------------------------------------------------------------ config


class SourceSpec(Section):
    """One JSONL source of a mixture."""

    name: str = Field(min_length=1)
    """Unique name of the source; it labels counters, logs and `Sample.source`."""

    path: str = Field(min_length=1)
    """The JSONL file (relative paths are taken from the mixture YAML's directory)."""

    root: Optional[str] = None
    """Directory media paths are relative to; default: the JSONL file's directory."""

    paths: Literal["relative_to_root", "as_written"] = "relative_to_root"
    """How media paths in the records are read: relative to `root` (absolute ones kept), or
    as written (absolute, or relative to the working directory the run starts in), which is
    how the Long-VITA release reads its files."""

    ratio: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    """Use int(len * ratio) records per epoch, wrapping around the file when ratio > 1; 0 drops it."""

    num: Optional[int] = Field(default=None, ge=0)
    """Optional cap on the number of records taken per epoch."""

    @field_validator("path", "root")
    @classmethod
    def _resolve_relative(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        base_dir = (info.context or {}).get("base_dir")
        if base_dir and not os.path.isabs(value):
            value = os.path.join(base_dir, value)
        return os.path.normpath(value)

    @model_validator(mode="after")
    def _root_or_as_written(self) -> "SourceSpec":
        if self.paths == "as_written" and self.root is not None:
            raise ValueError("root: has no effect with paths: as_written (media paths are read "
                             "as written); remove one of the two")
        return self

    @property
    def media_root(self) -> str:
        """The directory media paths of this source are resolved against (the working
        directory for `paths: as_written`: relative paths are read from there, absolute ones
        as they are)."""
        if self.paths == "as_written":
            return os.getcwd()
        return self.root if self.root is not None else os.path.dirname(self.path)

    def count(self, num_records: int) -> int:
        """Records this source contributes per epoch: min(int(num_records * ratio), num).

        The product is exact (the ratio is read as the decimal it was written as), so e.g.
        ratio 0.29 of 100 records is 29, not int(28.999...).
        """
        selected = int(Fraction(repr(self.ratio)) * num_records)
        return selected if self.num is None else min(selected, self.num)


class MixtureConfig(Section):
    """A data mixture: the list of sources of one stage."""

    sources: List[SourceSpec] = Field(min_length=1)
    """The JSONL sources, in a fixed order (their index is `source_idx`)."""

    @model_validator(mode="after")
    def _unique_names(self) -> "MixtureConfig":
        first_index: Dict[str, int] = {}
        for index, source in enumerate(self.sources):
            if source.name in first_index:
                raise ValueError(f"sources[{index}].name: duplicate source name {source.name!r} "
                                 f"(also sources[{first_index[source.name]}])")
            first_index[source.name] = index
        return self

    @classmethod
    def from_yaml(cls, path: str, *, check_files: bool = True) -> "MixtureConfig":
        """Load and validate a mixture YAML; relative paths are resolved from its directory.

        Every error is a `UserInputError` (a ValueError) that names the file and the key, e.g.
        ``"mix.yaml: sources[2].ratio: Input should be greater than or equal to 0"``.
        With `check_files`, each source's JSONL must exist.
        """
        try:
            with open(path, encoding="utf-8") as handle:
                raw = yaml.safe_load(handle)
        except OSError as error:
            raise UserInputError(f"{path}: cannot read mixture file ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise UserInputError(f"{path}: not valid YAML ({error})") from None
        base_dir = os.path.dirname(os.path.abspath(path))
        config = cls.from_dict(raw, base_dir=base_dir, origin=path)
        if check_files:
            for index, source in enumerate(config.sources):
                if not os.path.isfile(source.path):
                    raise UserInputError(f"{path}: sources[{index}].path: no such file "
                                         f"{source.path} (source {source.name!r})")
        return config

    @classmethod
    def from_dict(cls, raw: Any, *, base_dir: str, origin: str) -> "MixtureConfig":
        """Validate an already-parsed mixture mapping; `origin` names it in error messages."""
        if isinstance(raw, dict) and "dataset" in raw and "sources" not in raw:
            from mindspeed_vita.data.release_mixture import release_to_sources

            raw = release_to_sources(raw, origin=origin)
        if not isinstance(raw, dict):
            raise UserInputError(f"{origin}: a mixture must be a mapping with key 'sources' "
                                 f"(or the release's 'dataset'), got {type(raw).__name__}")
        try:
            return cls.model_validate(raw, context={"base_dir": base_dir})
        except ValidationError as error:
            raise UserInputError(f"{origin}: " + "; ".join(_describe(e) for e in error.errors())) from None


def _describe(error: Dict[str, Any]) -> str:
    """One pydantic error as "key.path: message" (sources[2].ratio: ...)."""
    key = ""
    for part in error["loc"]:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    if error["type"] == "value_error":  # our own validator: its message already names the key
        message = str(error["ctx"]["error"])
        return message if not key else f"{key}: {message}"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {error['msg']}" if key else error["msg"]


# ------------------------------------------------------------------------ permutation


def _derive_key(*parts: object) -> int:
    """A 64-bit key from its parts, identical on every machine and process (no `hash()`)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping multiplication)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    return x ^ (x >> np.uint64(31))


class KeyedPermutation:
    """A pseudo-random bijection of [0, n), evaluated per index: O(1) memory for any n.

    A balanced Feistel network on the smallest even number of bits covering n is a bijection
    of [0, 2^bits); applying it again while the result is >= n ("cycle walking") restricts
    it to a bijection of [0, n). The domain is < 4n, so under 4 applications are expected.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        half_bits = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._half_bits = np.uint64(half_bits)
        self._half_mask = np.uint64((1 << half_bits) - 1)
        self._round_keys = [np.uint64(_derive_key(key, r)) for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half_bits, x & self._half_mask
        for round_key in self._round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & self._half_mask)
        return (left << self._half_bits) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Image of each index (int64 array in [0, n)) under the permutation."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        if self.n == 1:
            return np.zeros_like(index)
        with np.errstate(over="ignore"):
            out = self._encrypt(index.astype(np.uint64))
            outside = out >= np.uint64(self.n)
            while outside.any():
                out[outside] = self._encrypt(out[outside])
                outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


# ----------------------------------------------------------------------------- stream


class StreamItem(NamedTuple):
    """One item of a stream: its position (in the caller's stream or shard), and the record."""

    position: int
    epoch: int
    source_idx: int
    line_idx: int


@dataclass(frozen=True)
class RawRecord:
    """The text of one record and where it came from; what `parse_fn` receives."""

    text: str
    source: str  # source name
    root: str  # media root of the source
    path: str  # the JSONL file
    line: int  # 1-based line number in that file


class _PositionedItems(abc.ABC):
    """An endless, positioned order of stream items: `items` is the one primitive; one item and
    iteration from any position (what exact resume needs) follow from it."""

    @abc.abstractmethod
    def items(self, positions: np.ndarray) -> List[StreamItem]:
        """The items at `positions` (int64 array of positions >= 0 in this order)."""

    def item(self, position: int) -> StreamItem:
        """The item at position `position`."""
        return self.items(np.array([position]))[0]

    def iterate(self, start: int = 0, *, block: int = 1024) -> Iterator[StreamItem]:
        """Items at positions start, start+1, ... forever (epochs roll over); resumes exactly."""
        position = int(start)
        while True:
            yield from self.items(np.arange(position, position + block))
            position += block


class MixtureStream(_PositionedItems):
    """Deterministic endless order of the mixture's records for one seed.

    Position k (0-based, counting from the start of epoch `epoch`) lies in epoch
    `epoch + k // items_per_epoch`. Within an epoch the order is a keyed permutation of the
    concatenated per-source selections; source s contributes `count_s` items, its j-th being
    record `P_s(j mod len_s)` where `P_s` is a keyed permutation of the file (so a ratio < 1
    takes a pseudo-random subset, a different one each epoch; a ratio > 1 takes every record
    floor(ratio) times plus a subset). `item(k)` is O(1) time and memory.

    `sources` (default: `source_index.open_source` per config entry) only need `__len__` and
    `read(i) -> (line_no, text)`.
    """

    def __init__(self, config: MixtureConfig, *, seed: int, epoch: int = 0,
                 cache_dir: Optional[str] = None, sources: Optional[Sequence[Any]] = None):
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.config = config
        self.seed = int(seed)
        self.epoch = int(epoch)
        if sources is None:
            sources = [open_source(spec.path, cache_dir=cache_dir) for spec in config.sources]
        if len(sources) != len(config.sources):
            raise ValueError(f"{len(sources)} source readers for {len(config.sources)} configured sources")
        self.sources = list(sources)
        self.lengths = [len(source) for source in self.sources]
        self.counts = [spec.count(length) for spec, length in zip(config.sources, self.lengths)]
        for spec, length, count in zip(config.sources, self.lengths, self.counts):
            if count > 0 and length == 0:
                raise ValueError(f"source {spec.name!r} ({spec.path}) has no records")
        self._ends = np.cumsum(np.array(self.counts, dtype=np.int64))
        self.items_per_epoch = int(self._ends[-1]) if len(self._ends) else 0
        if self.items_per_epoch == 0:
            raise ValueError("the mixture selects no records (every source has ratio 0, num 0 or no lines)")
        self._permutations: Dict[tuple, KeyedPermutation] = {}

    def fingerprint(self) -> str:
        """Short digest of everything that defines the order (to validate resumed state)."""
        parts = (self.seed, self.epoch, [s.name for s in self.config.sources], self.lengths, self.counts)
        return hashlib.sha1(repr(parts).encode("utf-8")).hexdigest()[:16]

    def _permutation(self, epoch: int, source_idx: Optional[int]) -> KeyedPermutation:
        cache_key = (epoch, source_idx)
        permutation = self._permutations.get(cache_key)
        if permutation is None:
            if len(self._permutations) > 4 * (len(self.sources) + 1):
                self._permutations.clear()  # only the current epoch or two are ever hot
            if source_idx is None:
                permutation = KeyedPermutation(self.items_per_epoch, _derive_key(self.seed, epoch, "order"))
            else:
                name = self.config.sources[source_idx].name
                permutation = KeyedPermutation(self.lengths[source_idx],
                                               _derive_key(self.seed, epoch, "records", name))
            self._permutations[cache_key] = permutation
        return permutation

    def items(self, positions: np.ndarray) -> List[StreamItem]:
        """The items at an array of stream positions (vectorised `item`)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.min() < 0:
            raise IndexError("stream positions must be >= 0")
        epochs = self.epoch + positions // self.items_per_epoch
        within = positions % self.items_per_epoch
        source_idx = np.zeros_like(positions)
        line_idx = np.zeros_like(positions)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            concatenated = self._permutation(int(epoch), None)(within[in_epoch])
            # source s owns concatenated positions [ends[s-1], ends[s])
            owner = np.searchsorted(self._ends, concatenated, side="right")
            starts = self._ends[owner] - np.array(self.counts, dtype=np.int64)[owner]
            offset_in_source = concatenated - starts
            lines = np.empty_like(concatenated)
            for s in np.unique(owner):
                of_s = owner == s
                lines[of_s] = self._permutation(int(epoch), int(s))(offset_in_source[of_s] % self.lengths[s])
            source_idx[in_epoch] = owner
            line_idx[in_epoch] = lines
        return [StreamItem(int(p), int(e), int(s), int(l))
                for p, e, s, l in zip(positions, epochs, source_idx, line_idx)]

    def shard(self, dp_rank: int, dp_size: int) -> "MixtureShard":
        """The strided shard of data-parallel rank `dp_rank`: global positions rank + k*size."""
        return MixtureShard(self, offset=0, stride=1).shard(dp_rank, dp_size)

    def read(self, source_idx: int, line_idx: int) -> RawRecord:
        """The text and location of record `line_idx` of source `source_idx`."""
        spec = self.config.sources[source_idx]
        line_no, text = self.sources[source_idx].read(line_idx)
        return RawRecord(text=text, source=spec.name, root=spec.media_root, path=spec.path, line=line_no)

    def describe(self) -> List[Dict[str, Any]]:
        """Per-source table: name, records in the file, ratio, cap and items per epoch."""
        return [dict(name=spec.name, records=length, ratio=spec.ratio, num=spec.num, items=count)
                for spec, length, count in zip(self.config.sources, self.lengths, self.counts)]


class MixtureShard(_PositionedItems):
    """Every `stride`-th item of a stream starting at `offset`; position k here is global
    position offset + k * stride. Shards of one level are disjoint and together cover the
    stream (and can be sharded again, e.g. per data-parallel rank, then per worker)."""

    def __init__(self, stream: MixtureStream, *, offset: int, stride: int):
        self.stream = stream
        self.offset = int(offset)
        self.stride = int(stride)

    def shard(self, rank: int, size: int) -> "MixtureShard":
        """Sub-shard `rank` of `size` of this shard."""
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={rank}, dp_size={size}")
        return MixtureShard(self.stream, offset=self.offset + rank * self.stride, stride=self.stride * size)

    def global_position(self, position: int) -> int:
        """Stream position of shard position `position`."""
        return self.offset + int(position) * self.stride

    def items(self, positions: np.ndarray) -> List[StreamItem]:
        """Items at shard positions (their `position` is the shard position)."""
        positions = np.asarray(positions, dtype=np.int64)
        found = self.stream.items(self.offset + positions * self.stride)
        return [item._replace(position=int(p)) for item, p in zip(found, positions)]

    def read(self, source_idx: int, line_idx: int) -> RawRecord:
        """Same as `MixtureStream.read`."""
        return self.stream.read(source_idx, line_idx)

    def fingerprint(self) -> str:
        """The stream's fingerprint plus this shard's offset and stride."""
        return f"{self.stream.fingerprint()}/{self.offset}+{self.stride}k"
