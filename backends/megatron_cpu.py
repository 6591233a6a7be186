"""Every adaptation megatron-core 0.16.1 needs to run on the CPU with gloo, in one place.

megatron-core is written for CUDA: it allocates buffers with `device=torch.cuda.current_device()`,
keeps its tensor-parallel RNG streams in CUDA generators and calls `torch.cuda.synchronize()`
around checkpoint I/O. On a host without CUDA each of those raises. The paths we use
(parallel_state, Column/RowParallelLinear, VocabParallelEmbedding with and without sequence
parallel, vocab_parallel_cross_entropy, TransformerBlock / TransformerLayer / SelfAttention / MLP,
activation recompute, distributed checkpointing) need exactly the shims below and nothing more.

`apply_megatron_cpu_adaptations()` is called by `CPUBackend.adapt_megatron()` - explicitly, by
the entry point, never as an import side effect. It is idempotent. `applied_adaptations()` says
which shims are active (logged by the trainer, asserted by the tests). The shims are process-wide
(megatron reads `torch.cuda.*` at call time): a process runs one backend. A test process that
must use megatron on CUDA after CPU tests calls `revert_megatron_cpu_adaptations()` first.

Shims:

* ``torch.cuda.current_device`` -> ``torch.device("cpu")``. megatron only uses the value as a
  ``device=`` argument (sequence-parallel all-gather buffers in ``GlobalMemoryBuffer`` and
  ``tensor_parallel.mappings``, weights when ``use_cpu_initialization=False``, rotary tables,
  checkpoint exchange tensors), so answering "cpu" puts every such allocation on the host.
  On a CPU-only torch build the original raises, so nothing that worked before changes.
* ``torch.cuda.synchronize`` -> no-op. CPU kernels run synchronously; megatron calls it around
  distributed-checkpoint saves/loads and in timers.
* The tensor-parallel RNG tracker. megatron keeps named RNG streams (data-parallel,
  model-parallel, expert-parallel) as CUDA generator states and swaps them in around weight
  init and dropout (``get_cuda_rng_tracker().fork()``), and saves/restores them around
  activation recompute (``tensor_parallel.checkpoint``). On CPU the only generator is the host
  default generator, so ``CPURNGStatesTracker`` keeps the named streams as host generator
  states and swaps those in, and ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read and
  write the host generator. Recompute then replays dropout masks exactly as on GPU.
* ``device='cuda'`` literals in the optimizer path. megatron's ``MixedPrecisionOptimizer`` /
  ``FP32Optimizer`` (found-inf flag, unit scale), ``clip_grads`` (norm accumulators) and the grad
  scalers build small tensors with a hard-coded ``device='cuda'``, and the grad buffer warms up
  its stream with one. Those modules get a ``torch`` stand-in (``_HostTorch``) whose ``tensor``
  and ``zeros`` put a 'cuda' request on the host; every other attribute is the real torch. The
  distributed optimizer and ``DistributedDataParallel`` then run unchanged on gloo (the trainer's
  tests check both against the single-process run).
  The optimizer and data-parallel modules are patched when they are imported (a meta-path
  hook), not imported here: a model or `infer` never needs them, and they cost seconds.
* ``clip_grad_by_total_norm_fp32`` asserts that every gradient is a ``torch.cuda.FloatTensor``;
  the optimizer module gets ``_clip_grads_by_total_norm``, the same scaling (coefficient
  ``max_norm / (total_norm + 1e-6)``, applied only when below 1) for host fp32 gradients.
* The mixed-precision and distributed optimizers sort parameters by ``param.type()`` strings
  (``'torch.cuda.BFloat16Tensor'`` -> fp32 master copy, ``'torch.cuda.FloatTensor'`` -> as is)
  in their constructors and raise on anything else. While those two constructors run (and only
  then), ``Tensor.type()`` without arguments names a host tensor as its CUDA twin, so host
  bf16 parameters get fp32 master weights exactly as on a GPU.
* ``DistributedOptimizer.get_parameter_state_dp_zero`` (the gather behind the 'fully_reshardable'
  optimizer checkpoint, which lets a checkpoint resume at another TP / DP size) moves its send
  buffers with ``.cuda()`` unless told to use the gloo data-parallel group. On the CPU every
  group is gloo, so it is always called with ``use_gloo_comm=True``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import sys
import types
from typing import Any, Dict, Optional, Tuple

import torch

#: name -> short reason, for every shim that is active
_APPLIED: Dict[str, str] = {}
#: (owner object, attribute name) -> the original value, recorded before the first patch
_ORIGINALS: Dict[Tuple[Any, str], Any] = {}
#: the CPU tracker class, created once so re-applying yields the very same class
_CPU_TRACKER_CLASS: Optional[type] = None


def applied_adaptations() -> Tuple[str, ...]:
    """Names of the shims currently applied (empty before the first call)."""
    return tuple(_APPLIED)


def _patch(owner: Any, attr: str, value: Any) -> None:
    if (owner, attr) not in _ORIGINALS:
        _ORIGINALS[(owner, attr)] = getattr(owner, attr)
    setattr(owner, attr, value)


def _cpu_current_device() -> torch.device:
    """Stand-in for `torch.cuda.current_device()`: megatron's allocations go to the host."""
    return torch.device("cpu")


def _cpu_synchronize(device=None) -> None:
    """Stand-in for `torch.cuda.synchronize()`: CPU kernels are already synchronous."""


def _patch_torch_cuda() -> None:
    _patch(torch.cuda, "current_device", _cpu_current_device)
    _patch(torch.cuda, "synchronize", _cpu_synchronize)
    _APPLIED["torch.cuda.current_device"] = "returns the cpu device for megatron's allocations"
    _APPLIED["torch.cuda.synchronize"] = "no-op: CPU work is synchronous"


def _host_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Stand-in for megatron's `_get_cuda_rng_state`: the host generator's state."""
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG states do not exist on the CPU backend; "
                           "set use_cudagraphable_rng=False")
    return torch.get_rng_state()


def _set_host_rng_state(new_state: torch.Tensor, device: int = -1,
                        graph_safe: bool = False) -> None:
    """Stand-in for megatron's `_set_cuda_rng_state`: restore the host generator's state."""
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG states do not exist on the CPU backend; "
                           "set use_cudagraphable_rng=False")
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class(base: type) -> type:
    """Subclass megatron's CudaRNGStatesTracker so isinstance checks elsewhere still hold."""
    from megatron.core.tensor_parallel import random as mp_random

    class CPURNGStatesTracker(base):
        """megatron's named RNG streams kept as host-generator states.

        `add(name, seed)` records the state the host generator has after `manual_seed(seed)`;
        `fork(name)` swaps that state into the host generator for the duration of the block and
        stores where the stream got to afterwards, exactly like the CUDA tracker does with the
        device generator.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"RNG tracker seed {seed} is already in use")
            if name in self.states_:
                raise ValueError(f"RNG tracker stream {name!r} already exists")
            self.seeds_.add(seed)
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"RNG tracker stream {name!r} was never added "
                               f"(call model_parallel_cuda_manual_seed first)")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CPURNGStatesTracker


def _patch_rng_tracker() -> None:
    global _CPU_TRACKER_CLASS
    from megatron.core.tensor_parallel import random as mp_random

    if _CPU_TRACKER_CLASS is None:
        _CPU_TRACKER_CLASS = _make_cpu_tracker_class(mp_random.CudaRNGStatesTracker)
    # initialize_rng_tracker() instantiates the class found under this module name
    _patch(mp_random, "CudaRNGStatesTracker", _CPU_TRACKER_CLASS)
    _patch(mp_random, "_get_cuda_rng_state", _host_rng_state)
    _patch(mp_random, "_set_cuda_rng_state", _set_host_rng_state)
    # A tracker created before the shim holds the CUDA class; replace it with a CPU one.
    if mp_random._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
            mp_random._CUDA_RNG_STATE_TRACKER, _CPU_TRACKER_CLASS):
        mp_random.initialize_rng_tracker(force_reset=True)
    _APPLIED["megatron.tensor_parallel.random"] = (
        "named RNG streams and recompute RNG replay use the host generator")


class _HostTorch(types.ModuleType):
    """`torch` for megatron modules that write `device='cuda'` literally: `tensor(...)` and
    `zeros(...)` asked for 'cuda' are made on the host; everything else is torch itself."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _host(kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return kwargs

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._host(kwargs))

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._host(kwargs))


_HOST_TORCH = _HostTorch()

#: megatron modules with `device='cuda'` literals on the training path
_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (the grad norm without apex / TE)
)
#: the modules the optimizer shims patch; only training imports them (DDP, optimizer: seconds of
#: imports a model or `infer` never needs), so each is patched when it is imported
_OPTIMIZER_MODULES = _CUDA_LITERAL_MODULES[:4] + ("megatron.core.optimizer.distrib_optimizer",)


def _clip_grads_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's `clip_grad_by_total_norm_fp32` without its CUDA-tensor assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype != torch.float32:
            raise TypeError(f"gradient clipping expects fp32 main grads, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


_HOST_TO_CUDA_TYPE = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                      "torch.HalfTensor": "torch.cuda.HalfTensor",
                      "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _host_tensors_typed_as_cuda():
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs:
            return name
        return _HOST_TO_CUDA_TYPE.get(name, name)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _wrap_init(cls) -> None:
    init = _ORIGINALS.get((cls, "__init__"), cls.__init__)

    def __init__(self, *args, **kwargs):
        with _host_tensors_typed_as_cuda():
            init(self, *args, **kwargs)

    _patch(cls, "__init__", __init__)


def _patch_optimizer_module(name: str, module: types.ModuleType) -> None:
    """The optimizer-path shims that live in module `name` (see the module docstring)."""
    if name in _CUDA_LITERAL_MODULES:
        _patch(module, "torch", _HOST_TORCH)
    if name == "megatron.core.optimizer.optimizer":
        _patch(module, "clip_grad_by_total_norm_fp32", _clip_grads_by_total_norm)
        if (module.Float16OptimizerWithFloat16Params, "__init__") not in _ORIGINALS:
            _wrap_init(module.Float16OptimizerWithFloat16Params)  # idempotent: wrap once
    if name == "megatron.core.optimizer.distrib_optimizer":
        cls = module.DistributedOptimizer
        gather = _ORIGINALS.get((cls, "get_parameter_state_dp_zero"),
                                cls.get_parameter_state_dp_zero)

        def get_parameter_state_dp_zero(self, use_gloo_comm=True, **kwargs):
            return gather(self, use_gloo_comm=True, **kwargs)

        _patch(cls, "get_parameter_state_dp_zero", get_parameter_state_dp_zero)
        if (cls, "__init__") not in _ORIGINALS:
            _wrap_init(cls)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies `_patch_optimizer_module` to an optimizer-path module right after it is
    imported. It finds the module through the other finders (so their import adjustments,
    e.g. mindspeed_vita.startup's, still apply) and only wraps the loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _OPTIMIZER_MODULES:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            if _APPLIED:  # not reverted meanwhile
                _patch_optimizer_module(fullname, module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _patch_cuda_literals() -> None:
    _patch(importlib.import_module("megatron.core.utils"), "torch", _HOST_TORCH)
    for name in _OPTIMIZER_MODULES:
        if name in sys.modules:
            _patch_optimizer_module(name, sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    _APPLIED["megatron optimizer device='cuda' literals"] = (
        "found-inf flags, scales and grad-norm accumulators live on the host")


def apply_megatron_cpu_adaptations() -> None:
    """Make megatron-core 0.16.1 run on the CPU with gloo (see module doc for each shim).

    Idempotent: a second call changes nothing. Call it before building megatron modules.
    """
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_cuda_literals()


def revert_megatron_cpu_adaptations() -> None:
    """Restore everything `apply_megatron_cpu_adaptations` replaced (no-op when none is applied).

    megatron's RNG tracker is reset, so the next `model_parallel_cuda_manual_seed` builds a CUDA
    one again."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
    for (owner, attr), original in _ORIGINALS.items():
        setattr(owner, attr, original)
    if _ORIGINALS:
        from megatron.core.tensor_parallel import random as mp_random

        mp_random._CUDA_RNG_STATE_TRACKER = None
        mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    _ORIGINALS.clear()
    _APPLIED.clear()
