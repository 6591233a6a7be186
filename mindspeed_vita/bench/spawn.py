"""Run a benchmark body in N spawned processes that form one torch.distributed world (gloo on
the CPU), as torchrun would: each process sees RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, so
`parallel.process_groups.initialize_parallel` starts the world itself."""
from __future__ import annotations

import os
import queue as queue_module
import socket
import traceback
from typing import Any, Callable, Dict, List


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, body, cfg, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        import torch

        torch.set_num_threads(1)  # ranks share the machine's cores
        results.put((rank, True, body(rank, world, cfg)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_group(body: Callable[[int, int, Dict], Any], world: int, cfg: Dict, *, timeout: float,
              name: str) -> List[Any]:
    """`body(rank, world, cfg)` in `world` spawned processes (`body` a module-level function,
    its result plain Python data); the results in rank order. RuntimeError naming `name` and
    the failing ranks' tracebacks, or the timeout."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, body, cfg, results))
             for r in range(world)]
    for p in procs:
        p.start()
    by_rank, failures = {}, []
    try:
        for _ in range(world):
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue_module.Empty:
                raise RuntimeError(f"{name}: {world} processes gave no result within "
                                   f"{timeout:.0f} s (raise --timeout)") from None
            if ok:
                by_rank[rank] = payload
            else:
                failures.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not failures else 5)
            if p.is_alive():
                p.kill()
    if failures:
        raise RuntimeError(f"{name} failed\n" + "\n".join(failures))
    return [by_rank[r] for r in range(world)]
