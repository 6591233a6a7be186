"""Running every request of a model-parallel block on all of its ranks (CP and/or TP).

lmms-eval shards the documents of a task over all the processes of the launch (its view of
rank / world size comes from torchrun's environment, and its own barriers and gathers run over
the whole world, so every process must stay an lmms-eval participant). A model split over a
context-parallel (and/or tensor-parallel) block, however, needs all ranks of the block in each
forward, with the same request. `BlockExchange.run` reconciles the two: the ranks of a block
take turns as the owner of their own shard; the owner renders one request at a time and
broadcasts it over the block, every rank of the block executes it in step (ring-attention
prefill, sharded KV cache, `engine.agree_on_step`), and only the owner keeps the result. So
each document is generated exactly once, by its whole block, and lmms-eval gathers the
results to rank 0 as usual. Different blocks (data-parallel replicas) run independently.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch.distributed as dist

from mindspeed_vita.errors import UserInputError

#: what an owner broadcasts instead of a job when preparing it failed (e.g. a missing image):
#: every rank of the block raises the same error, nobody waits for a job that never comes
_FAILED = "mindspeed_vita.eval/failed"


class BlockExchange:
    """Executes jobs on every rank of one model-parallel block (`group`, its global `ranks`);
    `group=None` is a block of one process (the same loop, no communication)."""

    def __init__(self, group=None, ranks: Sequence[int] = ()):
        self.group = group
        self.ranks = sorted(int(r) for r in ranks) if group is not None else [0]

    @classmethod
    def for_model(cls, groups) -> "BlockExchange":
        """The block of a model loaded with `groups` (`ParallelGroups`): the tensor x context
        parallel group when the model is split, else no exchange."""
        if groups is None or groups.cp_size * groups.tp_size == 1:
            return cls()
        if groups.pp_size != 1:
            raise UserInputError("evaluation runs without pipeline parallelism (pp=1)")
        # NOTE: ParallelGroups has no tensor x context group; megatron builds it with the
        # others (initialize_model_parallel), so it is read from its parallel_state here
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_and_context_parallel_group()
        return cls(group, dist.get_process_group_ranks(group))

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _me(self) -> int:
        return dist.get_rank() if self.group is not None else 0

    def _broadcast(self, obj: Any, src: int) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def _counts(self, count: int) -> List[int]:
        if self.group is None:
            return [count]
        counts = [None] * self.size
        dist.all_gather_object(counts, count, group=self.group)
        return [int(c) for c in counts]

    def run(self, makers: Sequence[Callable[[], Any]], execute: Callable[[Any], Any]) -> List[Any]:
        """`execute(job)` for the jobs of every rank of the block, on every rank of it; returns
        the results of this rank's own jobs, in order. `makers[i]()` builds this rank's i-th
        job (rendering happens only on the owner, one job at a time); a job must pickle."""
        producers = [_once(make) for make in makers]
        return [outputs[0] for outputs in self.run_rounds(producers, execute)]

    def run_rounds(self, producers: Sequence[Callable[[List[Any]], Optional[Any]]],
                   execute: Callable[[Any], Any]) -> List[List[Any]]:
        """Like `run` for conversations of several rounds: `producers[i](outputs)` returns the
        next job of this rank's i-th item given the results of its earlier rounds, or None when
        the item is finished. Returns the list of round results of each of this rank's items.
        """
        me = self._me()
        results: List[List[Any]] = []
        for owner, count in zip(self.ranks, self._counts(len(producers))):
            for index in range(count):
                outputs: List[Any] = []
                while True:
                    job = self._next_job(producers[index] if owner == me else None, outputs,
                                         owner, index)
                    if job is None:
                        break
                    outputs.append(execute(job))
                if owner == me:
                    results.append(outputs)
        return results

    def _next_job(self, produce, outputs: List[Any], owner: int, index: int) -> Optional[Any]:
        """The owner's next job of one item, on every rank of the block (None: finished)."""
        job: Optional[Any] = None
        failure: Optional[BaseException] = None
        if produce is not None:
            try:
                job = produce(outputs)
            except Exception as error:  # re-raised below, once the others know
                failure = error
                job = (_FAILED, f"{type(error).__name__}: {error}")
        job = self._broadcast(job, owner)
        if isinstance(job, tuple) and len(job) == 2 and job[0] == _FAILED:
            if failure is not None:
                raise failure
            raise UserInputError(f"request {index} of rank {owner} failed there: {job[1]}")
        return job


def _once(make: Callable[[], Any]) -> Callable[[List[Any]], Optional[Any]]:
    """A producer of one round: the job of `make`, then nothing."""
    return lambda outputs: None if outputs else make()
