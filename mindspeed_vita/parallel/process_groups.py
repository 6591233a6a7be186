"""Process-group setup: torch.distributed + megatron-core parallel_state, seeded, on any backend.

One call (`initialize_parallel(backend, layout)`) at the start of every entry point (trainer,
inference, tests) returns the `ParallelGroups` that modules receive; one call
(`destroy_parallel`) at the end. Under torchrun the world comes from the environment
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT); a plain `python` process becomes a 1-rank world
on a free localhost port, so single-process runs use the same megatron code paths.
"""
from __future__ import annotations

import os
import socket
from typing import Tuple

import torch.distributed as dist

from backends.base import Backend
from mindspeed_vita.errors import ConfigError
from mindspeed_vita.parallel.groups import ParallelGroups
from mindspeed_vita.parallel.layout import ParallelLayout


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


def launch_world_size() -> int:
    """The number of processes this launch runs: torchrun's WORLD_SIZE, or 1 for a plain
    `python` process. Known before any process group starts, so the layout can be built and
    checked first."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return 1
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def _group_ranks(group) -> Tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


def _megatron_groups(layout: ParallelLayout) -> ParallelGroups:
    """Read back the groups megatron built (its order: tp fastest, then cp, dp, pp)."""
    from megatron.core import parallel_state as ps

    groups = {"tp": ps.get_tensor_model_parallel_group(), "cp": ps.get_context_parallel_group(),
              "dp": ps.get_data_parallel_group(with_context_parallel=False),
              "dp_cp": ps.get_data_parallel_group(with_context_parallel=True),
              "pp": ps.get_pipeline_model_parallel_group()}
    return ParallelGroups(layout=layout, rank=dist.get_rank(), **groups,
                          **{f"{name}_ranks": _group_ranks(g) for name, g in groups.items()})


def initialize_parallel(backend: Backend, layout: ParallelLayout, *,
                        seed: int = 1234) -> ParallelGroups:
    """Start torch.distributed (if needed) and megatron's groups for `layout`, then seed;
    return the groups (`ParallelGroups`) that modules receive explicitly.

    Build and check the layout first (`ParallelLayout.from_config` / `StageConfig.
    check_world_size`), so a bad configuration is refused before any process group starts;
    a world size that differs from `layout.world_size` is refused here, also before starting.
    Order matters: bind the device, start the default group with `backend.dist_backend`, apply
    the backend's megatron adaptations (CPU shims, MindSpeed on NPU), build megatron's groups,
    then seed the host/device generators and megatron's tensor-parallel RNG tracker (the
    model-parallel stream differs per tp rank, the default stream is shared).
    """
    if not isinstance(layout, ParallelLayout):
        raise TypeError(f"initialize_parallel needs a ParallelLayout, got {type(layout).__name__}")
    world = dist.get_world_size() if dist.is_initialized() else launch_world_size()
    if world != layout.world_size:
        raise ConfigError(
            f"the parallel layout tp={layout.tp} * pp={layout.pp} * cp={layout.cp} * "
            f"dp={layout.dp} = {layout.world_size} processes, but this launch has world size "
            f"{world} (check 'parallel.*' and the launcher's process count)")
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is already initialised; "
                           "call destroy_parallel() first")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend.set_device(local_rank)
    if not dist.is_initialized():
        _init_torch_distributed(backend)
    backend.adapt_megatron()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp)
    backend.seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return _megatron_groups(layout)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
