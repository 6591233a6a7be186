"""Run a test function in N gloo processes (the multi-process half of every parallel test).

Usage in a test::

    def _body(rank, world_size, tmp):      # module-level, so it pickles
        ...                                  # torch.distributed is initialised (gloo)
        return anything                      # tensors too, nested anywhere

    results = run_distributed(_body, world_size=2, args=(tmp_path,))

Each process sees RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT like under
torchrun. An exception in any rank fails the test with that rank's traceback; a rank that dies
without reporting (segfault, out of memory, os._exit) fails it with the exit code, at once.

Results travel BY VALUE: the worker serialises what it returns with `torch.save` into bytes
before it reaches the queue, so tensors nested in dicts, lists, tuples, namedtuples or
dataclasses arrive as plain copies. (Put on a multiprocessing queue directly, a tensor travels
as shared memory the sender must keep alive until the parent reads it; a worker that exits
first leaves the parent with `FileNotFoundError` in `multiprocessing/resource_sharer`.)
"""
from __future__ import annotations

import copy
import dataclasses
import io
import os
import queue as queue_module
import signal
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: seconds the parent waits for the other ranks once one has failed or died (they may be
#: blocked in a collective with it and would otherwise wait for gloo's own timeout)
FAILURE_GRACE_S = 10.0
#: seconds an exited rank's report may still be in flight through the queue (a clean exit
#: flushes it first; a crash after reporting may have flushed it too)
EXIT_REPORT_GRACE_S = {True: 10.0, False: 2.0}  # keyed by "exit code was 0"


def to_bytes(obj: Any) -> bytes:
    """`obj` serialised by value: every tensor inside it (detached, at any nesting depth,
    in any picklable container) is copied into the bytes, none is shared."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Any:
    """Inverse of `to_bytes`; tensors come back on the CPU."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detached(obj: Any) -> Any:
    """`obj` with every tensor in its dicts, lists, tuples, namedtuples and dataclasses
    detached (results are values: they come back as plain leaf tensors, not as tensors that
    still require grad). Other objects are left as they are; `to_bytes` copies their tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps OrderedDict / defaultdict and their settings
        out.clear()
        out.update((k, detached(v)) for k, v in obj.items())
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(detached(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: detached(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _worker(rank, world_size, port, fn, args, queue, init_pg):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        torch.set_num_threads(1)
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        payload = to_bytes(detached(fn(rank, world_size, *args)))
        queue.put((rank, True, payload))
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


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code} (exit code {code})"
    return f"exit code {code}"


def run_distributed(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                    init_process_group: bool = True, timeout: float = 300.0) -> List[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; return the results
    ordered by rank (by value, tensors on the CPU), or raise AssertionError naming the failing
    ranks with their tracebacks or exit codes. `timeout` bounds the whole run."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), queue,
                                               init_process_group))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    failures: Dict[int, str] = {}
    deadline = time.monotonic() + timeout
    exited_at: Dict[int, float] = {}  # rank -> when it was first seen exited without a report
    first_failure_at = None
    try:
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            if now > deadline:
                for r in range(world_size):
                    if r not in results and r not in failures:
                        failures[r] = f"did not report within {timeout:.0f} s"
                break
            if first_failure_at is not None and now > first_failure_at + FAILURE_GRACE_S:
                for r in range(world_size):
                    if r not in results and r not in failures:
                        failures[r] = ("still running after another rank failed (killed; "
                                       "probably blocked in a collective with it)")
                break
            try:
                rank, ok, payload = queue.get(timeout=0.5)
            except queue_module.Empty:
                rank = None
            if rank is not None:
                if ok:
                    results[rank] = from_bytes(payload)
                else:
                    failures[rank] = payload
                    first_failure_at = first_failure_at or time.monotonic()
                continue
            for r, p in enumerate(procs):
                if r in results or r in failures or p.exitcode is None:
                    continue
                # a clean exit may still have its report in flight through the queue
                seen = exited_at.setdefault(r, time.monotonic())
                if time.monotonic() > seen + EXIT_REPORT_GRACE_S[p.exitcode == 0]:
                    failures[r] = f"died without reporting: {_exit_reason(p.exitcode)}"
                    first_failure_at = first_failure_at or time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=0 if failures else 30)
            if p.is_alive():
                p.kill()
                p.join(timeout=30)
        queue.close()
    if failures:
        raise AssertionError("\n".join(f"rank {r} failed:\n{failures[r]}"
                                       for r in sorted(failures)))
    return [results[r] for r in range(world_size)]
