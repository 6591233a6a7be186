"""Building models on the `meta` device (shapes and dtypes, no storage), whatever the backend.

Two things allocate outside `with torch.device("meta")`: megatron-core passes an explicit
`device=torch.cuda.current_device()` (an explicit device wins over the default device; on CPU
our shim answers "cpu"), and model code moves its modules to `backend.device()` after building
them. `meta_build` covers both for the duration of one block, and restores them afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from backends.base import Backend


class MetaDeviceBackend:
    """`backend` with `device()` answering `meta`; every other attribute is the wrapped one's."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def device(self, local_rank=None) -> torch.device:
        """Always the meta device: moving a module there does not materialise it."""
        return torch.device("meta")

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


@contextlib.contextmanager
def meta_build(backend: Backend) -> Iterator[MetaDeviceBackend]:
    """Inside the block every tensor lives on `meta`; yields the backend to build with.

    `torch.cuda.current_device` answers "meta" inside the block (for megatron's explicit device
    arguments) and is restored afterwards, whatever it was before (the CPU shim or CUDA's own).
    """
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("meta")
    try:
        with torch.device("meta"):
            yield MetaDeviceBackend(backend)
    finally:
        torch.cuda.current_device = original
