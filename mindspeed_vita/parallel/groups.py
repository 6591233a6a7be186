"""ParallelGroups: the layout plus this rank's process groups, handed to modules explicitly.

`initialize_parallel(backend, layout)` returns one; models, the loss reduction, the trainer and
checkpointing take it as an argument instead of reading megatron's `parallel_state` globals
(megatron's own layers still use those; they hold the same groups).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Tuple

from mindspeed_vita.parallel.layout import ParallelLayout


@dataclass(frozen=True, eq=False)
class ParallelGroups:
    """This rank's torch.distributed groups on every axis of `layout`, with their members.

    `tp`, `cp`, `dp`, `dp_cp` (data x context parallel: where gradients and the loss are
    reduced) and `pp` are process groups; `<axis>_ranks` the global ranks in each, in group
    order, so `<axis>_rank` is this rank's index there and `<axis>_size` the group's size.
    """

    layout: ParallelLayout
    rank: int
    tp: Any
    cp: Any
    dp: Any
    dp_cp: Any
    pp: Any
    tp_ranks: Tuple[int, ...]
    cp_ranks: Tuple[int, ...]
    dp_ranks: Tuple[int, ...]
    dp_cp_ranks: Tuple[int, ...]
    pp_ranks: Tuple[int, ...]

    def __post_init__(self):
        expected = {"tp": self.layout.tp, "cp": self.layout.cp, "dp": self.layout.dp,
                    "dp_cp": self.layout.dp * self.layout.cp, "pp": self.layout.pp}
        for axis, size in expected.items():
            ranks = getattr(self, f"{axis}_ranks")
            if len(ranks) != size or self.rank not in ranks:
                raise ValueError(f"{axis} group {ranks} of rank {self.rank} does not match the "
                                 f"layout's {axis} size {size}")

    def __deepcopy__(self, memo) -> "ParallelGroups":
        # process groups cannot be copied, and a copied model must use the same ones
        return self

    # ------------------------------------------------------------------ sizes and ranks
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def sequence_parallel(self) -> bool:
        return self.layout.sequence_parallel

    @property
    def tp_size(self) -> int:
        return len(self.tp_ranks)

    @property
    def cp_size(self) -> int:
        return len(self.cp_ranks)

    @property
    def dp_size(self) -> int:
        return len(self.dp_ranks)

    @property
    def dp_cp_size(self) -> int:
        return len(self.dp_cp_ranks)

    @property
    def pp_size(self) -> int:
        return len(self.pp_ranks)

    @property
    def tp_rank(self) -> int:
        return self.tp_ranks.index(self.rank)

    @property
    def cp_rank(self) -> int:
        return self.cp_ranks.index(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dp_ranks.index(self.rank)

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_cp_ranks.index(self.rank)

    @property
    def pp_rank(self) -> int:
        return self.pp_ranks.index(self.rank)

    def with_sequence_parallel(self, enabled: bool) -> "ParallelGroups":
        """The same groups with sequence parallelism on or off (it only changes how the TP
        group splits activations, not the groups), e.g. to compare both in one world."""
        return replace(self, layout=self.layout.with_sequence_parallel(enabled))
