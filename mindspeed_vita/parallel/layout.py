"""ParallelLayout: the one place that knows the parallel degrees and the rules they impose.

Built once per run from the config's `parallel` section and the world size
(`ParallelLayout.from_config`), before any process group starts; every component asks it
instead of re-deriving a rule: the config validation (`StageConfig`), the packer (row and
sample multiples), the models (heads vs TP) and the checkpoint converters (TP shards). Each
refusal is a `ConfigError` naming the config keys and their values.

The rules:
* every degree >= 1, tp * pp * cp * dp == world size (dp = -1 in the config: inferred);
* pp == 1: no pipeline schedule is wired, so pp > 1 is refused rather than run wrongly;
* sequence parallel needs tp > 1 (it splits the sequence over the TP group);
* TP splits attention heads, key/value groups and the MLP width evenly;
* a packed row is a multiple of `seq_multiple`: 2 * cp (zigzag cuts 2 * cp chunks), times tp
  under sequence parallel (each TP rank then takes an equal slice of every CP chunk);
* in reset packing every sample is padded to `segment_multiple` = 2 * cp, so zigzag can split
  each sample on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

from mindspeed_vita.errors import ConfigError

if TYPE_CHECKING:
    from mindspeed_vita.config.model import LanguageConfig
    from mindspeed_vita.config.schema import ParallelConfig


def _name(key: str) -> str:
    """A config key quoted as the messages show it; command-line flags stay bare."""
    return key if key.startswith("--") else f"'{key}'"


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of each parallel axis (tp * pp * cp * dp == world_size) and what they imply.

    Constructing one validates the degrees; `check_language` / `check_seq_length` /
    `check_segment_multiple` validate a model or data setting against it.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False

    def __post_init__(self):
        for axis in ("tp", "pp", "cp", "dp"):
            value = getattr(self, axis)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config key 'parallel.{axis}' = {value!r}: parallel degrees "
                                  f"must be integers >= 1")
        if self.pp != 1:
            raise ConfigError(
                f"config key 'parallel.pp' = {self.pp}: pipeline parallelism is not supported "
                f"(no pipeline schedule is wired); use 'parallel.pp' = 1 and split the model "
                f"with 'parallel.tp' instead")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("config key 'parallel.sequence_parallel' = True needs "
                              "'parallel.tp' > 1 (got 'parallel.tp' = 1)")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, parallel: "ParallelConfig", world_size: Optional[int]) -> "ParallelLayout":
        """The layout of `parallel` (a `ParallelConfig`) on `world_size` processes.

        `dp = -1` in the config is inferred as world_size / (tp * pp * cp); an explicit dp must
        make the product equal the world size. `world_size=None` gives the smallest world the
        config allows (its dp, or 1 when inferred), for the rules that do not depend on dp
        (config validation before the world size is known).
        """
        tp, pp, cp = parallel.tp, parallel.pp, parallel.cp
        if world_size is None:
            world_size = tp * pp * cp * (parallel.dp if parallel.dp > 0 else 1)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world size {world_size!r}: must be an integer >= 1 (the number "
                              f"of processes, e.g. --world-size or torchrun's WORLD_SIZE)")
        model_parallel = tp * pp * cp
        if parallel.dp == -1:
            if world_size % model_parallel:
                raise ConfigError(
                    f"config keys 'parallel.tp' * 'parallel.pp' * 'parallel.cp' = {tp} * {pp} * "
                    f"{cp} = {model_parallel} does not divide the world size {world_size}")
            dp = world_size // model_parallel
        else:
            dp = parallel.dp
            if model_parallel * dp != world_size:
                raise ConfigError(
                    f"config keys 'parallel.tp' * 'parallel.pp' * 'parallel.cp' * 'parallel.dp' "
                    f"= {tp} * {pp} * {cp} * {dp} = {model_parallel * dp} is not the world size "
                    f"{world_size}")
        return cls(tp=tp, pp=pp, cp=cp, dp=dp, sequence_parallel=parallel.sequence_parallel)

    def with_sequence_parallel(self, enabled: bool) -> "ParallelLayout":
        """The same degrees with sequence parallelism on or off (the groups do not change)."""
        return replace(self, sequence_parallel=enabled)

    # ------------------------------------------------------------------ derived
    @property
    def world_size(self) -> int:
        """Processes the layout spans: tp * pp * cp * dp."""
        return self.tp * self.pp * self.cp * self.dp

    @property
    def seq_multiple(self) -> int:
        """What a packed row length must be a multiple of: 2 * cp under context parallelism
        (zigzag cuts 2 * cp chunks), times tp under sequence parallelism."""
        multiple = 2 * self.cp if self.cp > 1 else 1
        return multiple * self.tp if self.sequence_parallel else multiple

    @property
    def segment_multiple(self) -> int:
        """What every reset-mode sample is padded to: 2 * cp, so zigzag splits each sample."""
        return 2 * self.cp if self.cp > 1 else 1

    def _seq_multiple_text(self) -> str:
        """How seq_multiple is made, naming the keys, e.g. "2 * 'parallel.cp' = 6
        ('parallel.cp' = 3)"."""
        terms, values = [], []
        if self.cp > 1:
            terms.append("2 * 'parallel.cp'")
            values.append(f"'parallel.cp' = {self.cp}")
        if self.sequence_parallel:
            terms.append("'parallel.tp'")
            values.append(f"'parallel.tp' = {self.tp}")
        what = " * ".join(terms) or "1"
        return f"{what} = {self.seq_multiple}" + (f" ({', '.join(values)})" if values else "")

    # ------------------------------------------------------------------ rules
    def check_language(self, language: "LanguageConfig", *, prefix: str = "model.language",
                       tp_key: str = "parallel.tp") -> None:
        """ConfigError unless TP splits the decoder evenly: attention heads, key/value groups
        (megatron gives each TP rank whole groups) and the MLP width. `prefix` / `tp_key` name
        the keys in the message (a checkpoint's config, a `--tp` flag)."""
        for field in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(language, field)
            if value % self.tp:
                raise ConfigError(f"config key {_name(f'{prefix}.{field}')} = {value} is not "
                                  f"divisible by {_name(tp_key)} = {self.tp}")

    def check_seq_length(self, seq_length: int, *, key: str = "data.seq_length") -> None:
        """ConfigError unless a row of `seq_length` tokens splits over cp (and tp under
        sequence parallelism): seq_length % seq_multiple == 0."""
        if seq_length % self.seq_multiple:
            raise ConfigError(f"config key {_name(key)} = {seq_length} is not divisible by "
                              f"{self._seq_multiple_text()}")

    def check_segment_multiple(self, segment_multiple: int, *,
                               key: str = "segment_multiple") -> None:
        """ConfigError unless reset-mode samples padded to `segment_multiple` can be split by
        zigzag (a multiple of 2 * cp), so no packed sample is unsplittable."""
        if segment_multiple < 1 or segment_multiple % self.segment_multiple:
            raise ConfigError(
                f"{_name(key)} = {segment_multiple}: reset-mode samples must be padded to a "
                f"multiple of 2 * 'parallel.cp' = {self.segment_multiple} ('parallel.cp' = "
                f"{self.cp}) so context parallelism can split every sample")
