"""megatron-core CPU shims: applied, idempotent, and TP layers on gloo equal plain PyTorch."""
import pytest
import torch

from backends.megatron_cpu import (
    applied_adaptations, apply_megatron_cpu_adaptations, revert_megatron_cpu_adaptations)
from tests.dist_utils import run_distributed

IN, OUT, SEQ, BATCH = 8, 6, 4, 2



def test_shims_applied_and_idempotent():
    from megatron.core.tensor_parallel import random as mp_random

    apply_megatron_cpu_adaptations()
    first = (applied_adaptations(), torch.cuda.current_device, torch.cuda.synchronize,
             mp_random.CudaRNGStatesTracker, mp_random._get_cuda_rng_state)
    apply_megatron_cpu_adaptations()
    second = (applied_adaptations(), torch.cuda.current_device, torch.cuda.synchronize,
              mp_random.CudaRNGStatesTracker, mp_random._get_cuda_rng_state)
    assert first == second  # nothing re-wrapped
    assert set(first[0]) == {"torch.cuda.current_device", "torch.cuda.synchronize",
                             "megatron.tensor_parallel.random",
                             "megatron optimizer device='cuda' literals"}
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # no-op instead of "Torch not compiled with CUDA enabled"
    assert isinstance(mp_random.get_cuda_rng_tracker(), mp_random.CudaRNGStatesTracker)


def test_revert_restores_originals_and_reapply_works():
    from megatron.core.tensor_parallel import random as mp_random

    revert_megatron_cpu_adaptations()
    originals = (torch.cuda.current_device, torch.cuda.synchronize,
                 mp_random.CudaRNGStatesTracker, mp_random._get_cuda_rng_state,
                 mp_random._set_cuda_rng_state)
    apply_megatron_cpu_adaptations()
    assert torch.cuda.current_device is not originals[0]
    assert issubclass(mp_random.CudaRNGStatesTracker, originals[2])
    revert_megatron_cpu_adaptations()
    assert applied_adaptations() == ()
    assert (torch.cuda.current_device, torch.cuda.synchronize, mp_random.CudaRNGStatesTracker,
            mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state) == originals
    assert mp_random._CUDA_RNG_STATE_TRACKER is None
    apply_megatron_cpu_adaptations()
    assert torch.cuda.current_device() == torch.device("cpu")


def test_rng_tracker_streams_on_host_generator():
    """Named streams are reproducible, independent of the default stream, and fork restores it."""
    from megatron.core.tensor_parallel import random as mp_random

    apply_megatron_cpu_adaptations()
    mp_random.model_parallel_cuda_manual_seed(11, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mp_random.get_cuda_rng_tracker()
    torch.manual_seed(3)
    with tracker.fork():
        a1 = torch.rand(4)
    after_fork = torch.rand(4)
    torch.manual_seed(3)
    expected_default = torch.rand(4)
    assert torch.equal(after_fork, expected_default)  # default stream untouched by the fork
    with tracker.fork():
        a2 = torch.rand(4)
    torch.manual_seed(11 + 2718)  # megatron's model-parallel seed for tp rank 0
    stream = torch.rand(8)
    assert torch.equal(torch.cat([a1, a2]), stream)  # the stream continues across forks
    # recompute's save/restore goes through the patched host-state functions
    state = mp_random._get_cuda_rng_state()
    x = torch.rand(3)
    mp_random._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), x)


def _column_parallel_body(rank, world_size, weight, bias, x):
    from backends import get_backend
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    initialize_parallel(get_backend("cpu"), ParallelLayout(tp=world_size))
    return {sp: _column_parallel_step(rank, world_size, weight, bias, x, sp)
            for sp in (False, True)}


def _column_parallel_step(rank, world_size, weight, bias, x, sequence_parallel):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=2,
                            tensor_model_parallel_size=world_size,
                            sequence_parallel=sequence_parallel, params_dtype=torch.float32)
    layer = ColumnParallelLinear(IN, OUT, config=cfg, init_method=torch.nn.init.normal_,
                                 bias=True, gather_output=False)
    rows = OUT // world_size
    with torch.no_grad():
        layer.weight.copy_(weight[rank * rows:(rank + 1) * rows])
        layer.bias.copy_(bias[rank * rows:(rank + 1) * rows])
    if sequence_parallel:  # the input arrives sequence-sharded: [s / tp, b, h]
        chunk = SEQ // world_size
        x = x[rank * chunk:(rank + 1) * chunk]
    x = x.clone().requires_grad_(True)
    y, _ = layer(x)  # [s, b, OUT / tp]
    (y * torch.arange(1.0, y.numel() + 1).view_as(y).div(10.0 * (rank + 1))).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _reference(weight, bias, x, world_size):
    """Single-process nn.Linear with the same per-rank loss weighting."""
    linear = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    y = linear(x)
    rows = OUT // world_size
    loss = 0.0
    for r in range(world_size):
        part = y[..., r * rows:(r + 1) * rows]
        loss = loss + (part * torch.arange(1.0, part.numel() + 1).view_as(part)
                       .div(10.0 * (r + 1))).sum()
    loss.backward()
    return y.detach(), x.grad, linear.weight.grad, linear.bias.grad


def test_column_parallel_linear_tp2_matches_nn_linear():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(OUT, IN, generator=gen), torch.randn(OUT, generator=gen)
    x = torch.randn(SEQ, BATCH, IN, generator=gen)
    y_ref, dx_ref, dw_ref, db_ref = _reference(weight, bias, x, 2)
    rows = OUT // 2
    per_rank = run_distributed(_column_parallel_body, world_size=2, args=(weight, bias, x))
    for sequence_parallel in (False, True):
        for rank, results in enumerate(per_rank):
            y, dx, dw, db = results[sequence_parallel]
            cols = slice(rank * rows, (rank + 1) * rows)
            torch.testing.assert_close(y, y_ref[..., cols], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(dw, dw_ref[cols], atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(db, db_ref[cols], atol=1e-5, rtol=1e-6)
            if sequence_parallel:  # reduce-scattered input grad: this rank's sequence slice
                chunk = SEQ // 2
                torch.testing.assert_close(dx, dx_ref[rank * chunk:(rank + 1) * chunk],
                                           atol=1e-5, rtol=1e-6)
            else:  # all-reduced input grad
                torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-6)


def _init_from_env_body(rank, world_size):
    import pytest
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from backends import get_backend
    from mindspeed_vita.config.schema import ConfigError
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    backend = get_backend("cpu")
    assert not dist.is_initialized()  # the runner left it to us, as torchrun does
    with pytest.raises(ConfigError, match="= 3 processes, but this launch has world size 2"):
        initialize_parallel(backend, ParallelLayout(tp=3))
    assert not dist.is_initialized()  # refused before any process group started
    initialize_parallel(backend, ParallelLayout(tp=2), seed=7)
    with pytest.raises(RuntimeError, match="already initialised"):
        initialize_parallel(backend, ParallelLayout(tp=2))
    layout = (dist.get_backend(), parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_data_parallel_world_size())
    with tensor_parallel.get_cuda_rng_tracker().fork():
        model_parallel_draw = torch.rand(3)
    default_draw = torch.rand(3)
    destroy_parallel()
    destroy_parallel()  # safe twice
    return layout, model_parallel_draw.tolist(), default_draw.tolist(), dist.is_initialized()


def test_initialize_parallel_from_torchrun_env():
    results = run_distributed(_init_from_env_body, world_size=2, init_process_group=False)
    assert [r[0] for r in results] == [("gloo", 0, 2, 1), ("gloo", 1, 2, 1)]
    assert results[0][1] != results[1][1]  # tp ranks get distinct streams
    assert results[0][2] == results[1][2]  # the default stream is shared
    assert not any(r[3] for r in results)


def test_initialize_parallel_names_missing_env(monkeypatch):
    import torch.distributed as dist

    from backends import get_backend
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="incomplete: WORLD_SIZE, MASTER_PORT not set"):
        initialize_parallel(get_backend("cpu"), ParallelLayout())


def test_optimizer_shims_reach_modules_imported_after_the_shims():
    """The optimizer / data-parallel modules are not imported by the shims (a model or `infer`
    never needs them); when training imports them later they are patched on import. (Plain
    `import megatron.core` imports them at once; `infer` defers the package's __init__.)"""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, sys\nfrom mindspeed_vita import startup\n"
        "startup.defer_engine_package_init()\n"
        "from backends.megatron_cpu import apply_megatron_cpu_adaptations\n"
        "apply_megatron_cpu_adaptations()\n"
        "early = [m in sys.modules for m in ('megatron.core.optimizer.optimizer', "
        "'megatron.core.distributed.param_and_grad_buffer')]\n"
        "from megatron.core.optimizer import optimizer, distrib_optimizer, clip_grads\n"
        "from megatron.core.distributed import param_and_grad_buffer\n"
        "print(json.dumps([early, [type(m.torch).__name__ for m in "
        "(optimizer, clip_grads, param_and_grad_buffer)], "
        "optimizer.clip_grad_by_total_norm_fp32.__name__, "
        "distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero.__name__, "
        "distrib_optimizer.DistributedOptimizer.__init__.__module__]))\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr[-3000:]
    early, torches, clip, gather, init_module = json.loads(r.stdout.strip().splitlines()[-1])
    assert early == [False, False]
    assert torches == ["_HostTorch"] * 3
    assert clip == "_clip_grads_by_total_norm" and gather == "get_parameter_state_dp_zero"
    assert init_module == "backends.megatron_cpu"  # the constructor runs with host types
