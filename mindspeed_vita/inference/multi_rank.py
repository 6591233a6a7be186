"""Driving a model split over several processes (CP and/or TP) from rank 0.

Every rank must run each forward in step. Rank 0 is the one that knows the requests (the HTTP
server, or the command line); the others follow:

* rank 0 (`RankDriver.generate`, the `generate` callable of `GenerationService`) posts a
  numbered announcement in the process group's key-value store, then broadcasts the request's
  rendered token ids, pixels, token budget, sampling and seed to every rank, and generates;
* ranks > 0 (`follow`) wait for the next announcement, receive the request and generate the same
  thing. The per-token choice and stop decision come from rank 0 (`engine.agree_on_step`), so
  all ranks stop together, even on a stop string or a client that went away.

Waiting for a request happens on the store, in short polls, not inside a collective: an idle
server must not hit the collective timeout of the process group.
"""
from __future__ import annotations

import datetime
import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

log = logging.getLogger(__name__)
_KEY = "mindspeed_vita/request/{}"
_POLL = datetime.timedelta(seconds=30)


def _store():
    # the default group's store: every rank of the world already shares it
    return distributed_c10d._get_default_store()


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankDriver:
    """Rank 0's side: `generate` has `Generator.generate_ids`' signature and first hands the
    request to every other rank. `close()` tells them to exit."""

    def __init__(self, generator):
        self.generator = generator
        self._count = 0

    def _announce(self, what: bytes) -> None:
        _store().set(_KEY.format(self._count), what)
        self._count += 1

    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                 max_new_tokens: int, sampling, seed: int = 0,
                 on_token: Optional[Callable[[int], bool]] = None):
        """Broadcast the request, then generate in step with the other ranks."""
        self._announce(b"request")
        pixels = None if pixel_values is None else pixel_values.cpu()
        _broadcast((input_ids.cpu(), pixels, int(max_new_tokens), sampling, int(seed)))
        return self.generator.generate_ids(input_ids, pixel_values, max_new_tokens, sampling,
                                           seed, on_token=on_token)

    def close(self) -> None:
        """Let the following ranks return from `follow`."""
        self._announce(b"end")


def follow(generator) -> int:
    """Ranks > 0: generate every request rank 0 announces, until it announces the end.
    Returns the number of requests served."""
    store = _store()
    served = 0
    while True:
        key = _KEY.format(served)
        while True:
            try:
                store.wait([key], _POLL)
                break
            except RuntimeError:  # no request yet (DistStoreError is a RuntimeError)
                continue
        if store.get(key) == b"end":
            return served
        input_ids, pixels, max_new_tokens, sampling, seed = _broadcast(None)
        try:
            generator.generate_ids(input_ids, pixels, max_new_tokens, sampling, seed)
        except Exception:  # rank 0 fails the same way on the same input: it answers the
            # client (500/400) and serves on, so this rank must keep following too
            log.exception("request %d failed on this rank", served)
        served += 1
