"""ParallelLayout: the one object that knows the parallel degrees, built once from the config."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of each parallel axis; tp * pp * cp * dp == world_size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def seq_multiple(self) -> int:
        """Packed sequences must be a multiple of this (zigzag needs 2*cp chunks; sequence
        parallel splits each chunk over tp)."""
        m = 2 * self.cp if self.cp > 1 else 1
        return m * self.tp if self.sequence_parallel else m
