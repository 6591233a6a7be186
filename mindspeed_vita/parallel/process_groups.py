"""Process-group setup: torch.distributed + megatron-core parallel_state, seeded, on any backend.

One call (`initialize_parallel`) at the start of every entry point (trainer, inference, tests),
one call (`destroy_parallel`) at the end. Under torchrun the world comes from the environment
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT); a plain `python` process becomes a 1-rank world
on a free localhost port, so single-process runs use the same megatron code paths.
"""
from __future__ import annotations

import os
import socket

import torch.distributed as dist

from backends.base import Backend


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_torch_distributed(backend: Backend) -> None:
    """Start the default process group from torchrun's environment, or as a 1-rank world."""
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"torch.distributed environment is incomplete: {', '.join(missing)} not set "
                f"(launch with torchrun, or unset RANK/WORLD_SIZE for a single process)")
        dist.init_process_group(backend.dist_backend, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
        return
    dist.init_process_group(backend.dist_backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)


def initialize_parallel(backend: Backend, *, tp: int = 1, pp: int = 1, cp: int = 1,
                        seed: int = 1234) -> None:
    """Start torch.distributed (if needed) and megatron's tp/pp/cp/dp groups, then seed.

    Order matters: bind the device, start the default group with `backend.dist_backend`, apply
    the backend's megatron adaptations (CPU shims, MindSpeed on NPU), build megatron's groups,
    then seed the host/device generators and megatron's tensor-parallel RNG tracker (the
    model-parallel stream differs per tp rank, the default stream is shared).
    """
    for axis, size in (("tp", tp), ("pp", pp), ("cp", cp)):
        if size < 1:
            raise ValueError(f"{axis}={size}: parallel sizes must be >= 1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend.set_device(local_rank)
    if not dist.is_initialized():
        _init_torch_distributed(backend)
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    backend.adapt_megatron()

    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is already initialised; "
                           "call destroy_parallel() first")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp)
    backend.seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
