"""Run a test function in N gloo processes (the multi-process half of every parallel test).

Usage in a test::

    def _body(rank, world_size, tmp):      # module-level, so it pickles
        ...                                  # torch.distributed is initialised (gloo)
        return something_picklable

    results = run_distributed(_body, world_size=2, args=(tmp_path,))

Each process sees RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT like under
torchrun. An exception in any rank fails the test with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def by_value(obj):
    """Tensors -> numpy arrays, recursively: a tensor sent from a worker travels as shared memory
    that its sender must keep alive until the parent reads it; arrays are pickled by value."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy()
    if isinstance(obj, dict):
        return {k: by_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(by_value(v) for v in obj)
    return obj


def as_tensors(obj):
    """Inverse of `by_value`."""
    if hasattr(obj, "__array__") and not isinstance(obj, torch.Tensor):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: as_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_tensors(v) for v in obj)
    return obj


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, init_pg):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        import torch

        torch.set_num_threads(1)
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # report everything, including assertion errors
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if init_pg and dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:
                pass
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                    init_process_group: bool = True, timeout: float = 300.0) -> List[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; return the results
    ordered by rank, or raise AssertionError with the failing ranks' tracebacks."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), queue,
                                               init_process_group))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, failures = {}, []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = payload
            else:
                failures.append(f"rank {rank} failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]
