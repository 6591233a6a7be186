"""Training checkpoints: megatron dist_checkpointing for model + optimizer, plus the rest of the
state a run needs to continue exactly.

Layout of a run directory (`training.save`)::

    DIR/latest                       name of the newest complete checkpoint (written last)
    DIR/iter_0000008/                one checkpoint
        dist/                        megatron dist_checkpointing: {"model", "optimizer"}
        rank_00000.pt ...            per rank: scheduler, data-pipeline position, RNG states
        data_dp_00000.pt ...         per data-parallel rank: its data-pipeline position
        training.json                step, model config, parallel layout it was written at,
                                     the sample order the dp ranks divide (data_order)
        tokenizer/                   the run's tokenizer (so the checkpoint is self-contained)
    DIR/metrics.jsonl, DIR/loss.png

Model tensors are megatron `ShardedTensor`s (the language model's own `sharded_state_dict`;
vision and projector replicated) and the optimizer uses the distributed optimizer's
'fully_reshardable' format, so a checkpoint written at one TP / DP size loads at another.

The data position resumes exactly at the same dp size (each dp rank continues its stream) and
at another dp size without repeating or losing a sample (`data.stream_order`: the new ranks
share the samples the old ones had not trained on, then the stream after their frontier).

Atomic: everything is written into `iter_N.partial/`, fsynced, renamed to `iter_N/`, and only
then is `latest` replaced (write + fsync + rename). A crash at any point leaves either no new
checkpoint or a `.partial` directory that is never read (and is removed by the next save).
The last `training.keep_last` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import types
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from mindspeed_vita.data.stream_order import StreamOrder, continue_order, order_of
from mindspeed_vita.errors import CheckpointError

LATEST = "latest"
TRAINING_FILE = "training.json"
DIST_DIR = "dist"
TOKENIZER_DIR = "tokenizer"
FORMAT = "mindspeed-vita-training-checkpoint"
_ITER = re.compile(r"^iter_(\d{7})$")
#: the distributed optimizer's checkpoint format that reshards over TP and DP
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def data_file(dp_rank: int) -> str:
    """Name of a checkpoint's file with the data position of data-parallel rank `dp_rank`."""
    return f"data_dp_{dp_rank:05d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------ finding checkpoints
def is_training_checkpoint(path: str) -> bool:
    """True for one checkpoint directory (`iter_N/` with training.json)."""
    return os.path.isfile(os.path.join(path, TRAINING_FILE))


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint `run_dir/latest` names, or None when the run has none yet. A `latest`
    that names a missing directory is a CheckpointError (the run directory was tampered with)."""
    marker = os.path.join(run_dir, LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(run_dir, name)
    if not _ITER.match(name) or not is_training_checkpoint(path):
        raise CheckpointError(f"{marker} names {name!r}, which is not a complete training "
                              f"checkpoint in {run_dir!r}")
    return path


def resolve_weights_source(path: str) -> str:
    """`path` as given to `training.load`: a run directory (-> its latest checkpoint), one
    training checkpoint, or anything else `models.build.load_pretrained` reads (returned as
    is). CheckpointError when it does not exist."""
    if not os.path.isdir(path):
        raise CheckpointError(f"config key 'training.load' = {path!r}: no such directory")
    if is_training_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    return latest if latest is not None else path


def read_training_meta(path: str) -> Dict[str, Any]:
    """The content of `training.json` of checkpoint `path`."""
    with open(os.path.join(path, TRAINING_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/{TRAINING_FILE} is not a {FORMAT}")
    return meta


# ------------------------------------------------------------------------ sharded state
def model_sharded_state_dict(model, groups) -> Dict[str, Any]:
    """megatron sharded state of a `LongVitaModel`: the language model's own (TP-sharded), the
    vision encoder and projector as replicated tensors (one main replica: tp = dp x cp = 0)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    state = model.language.sharded_state_dict(prefix="language.")
    replica = (0, groups.tp_rank, groups.dp_cp_rank)
    for part in ("vision", "projector"):
        for name, tensor in getattr(model, part).state_dict(prefix=f"{part}.",
                                                            keep_vars=True).items():
            state[name] = ShardedTensor.from_rank_offsets(name, tensor, replica_id=replica)
    return state


def _torch_adam_fixups(optimizer) -> None:
    """Two gaps of megatron 0.16's distributed optimizer when it runs torch's AdamW (no
    Transformer Engine / Apex - always on CPU and NPU, and on GPUs without TE):

    * loading the 'fully_reshardable' state copies every key of the live per-parameter state,
      'step' included, from a dict that has no 'step' (it is restored from the param groups);
    * `sharded_state_dict(is_loading=True)` reads the live state, which a fresh optimizer does
      not have yet.
    Both are fixed on our optimizer instance only, never on megatron's classes."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        main_param.copy_(tensors["param"])
        state = self.optimizer.state[main_param]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].copy_(tensors[key])

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or sub.config.use_precision_aware_optimizer:
            continue
        sub._set_main_param_and_optimizer_states = types.MethodType(
            set_main_param_and_optimizer_states, sub)
        inner = sub.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.tensor(0.0),
                                          "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


def _unshare_adam_steps(optimizer) -> None:
    """megatron's load gives every parameter's state the SAME 'step' tensor; torch's AdamW then
    increments it once per parameter. Give each state its own copy."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


# ------------------------------------------------------------------------ RNG
def rng_state(backend) -> Dict[str, Any]:
    """Host, device and megatron tracker RNG states, plus Python's."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    device = backend.device()
    if device.type != "cpu":  # the device module (torch.cuda / torch.npu) keeps its own
        state["device"] = getattr(torch, device.type).get_rng_state()
    return state


def set_rng_state(backend, state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "device" in state:
        getattr(torch, backend.device().type).set_rng_state(state["device"])


# ------------------------------------------------------------------------ save
def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(run_dir: str) -> List[str]:
    """Complete checkpoint directory names in `run_dir`, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    names = [n for n in os.listdir(run_dir) if _ITER.match(n)
             and is_training_checkpoint(os.path.join(run_dir, n))]
    return sorted(names)


def save_training_checkpoint(run_dir: str, step: int, *, model, ddp_model, optimizer,
                             scheduler, pipeline, groups, backend, tokenizer, stage,
                             counters: Dict[str, Any]) -> str:
    """Write checkpoint `run_dir/iter_<step>` from every rank (all ranks must call it) and
    point `latest` at it; returns its path. See the module doc for the layout and atomicity."""
    from megatron.core import dist_checkpointing

    final = os.path.join(run_dir, iter_dir_name(step))
    partial = final + ".partial"
    rank = _rank()
    if rank == 0:
        for name in os.listdir(run_dir):  # leftovers of a crash
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        os.makedirs(os.path.join(partial, DIST_DIR))
    _barrier()
    model_state = model_sharded_state_dict(model, groups)
    state = {"model": model_state,
             "optimizer": optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_FORMAT)}
    dist_checkpointing.save(state, os.path.join(partial, DIST_DIR))
    torch.save({"step": step, "scheduler": scheduler.state_dict(),
                "data": pipeline.state_dict() if pipeline is not None else None,
                "rng": rng_state(backend), "counters": counters,
                "dp_rank": groups.dp_rank, "dp_size": groups.dp_size},
               os.path.join(partial, f"rank_{rank:05d}.pt"))
    if pipeline is not None and groups.tp_rank == 0 and groups.cp_rank == 0:
        # one copy per dp rank (its tp / cp ranks read the same data)
        torch.save(pipeline.state_dict(), os.path.join(partial, data_file(groups.dp_rank)))
    _barrier()
    if rank == 0:
        layout = groups.layout
        meta = {"format": FORMAT, "step": step, "stage": stage.name,
                "model": stage.model.model_dump(mode="json"),
                "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp,
                           "sequence_parallel": layout.sequence_parallel},
                "world_size": layout.world_size,
                "context_token_ids": sorted(int(i) for i in tokenizer.context_token_ids),
                "data_order": (None if pipeline is None
                               else order_of(pipeline).state_dict())}
        tokenizer.save(os.path.join(partial, TOKENIZER_DIR))
        with open(os.path.join(partial, TRAINING_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        _fsync_tree(partial)
        if os.path.exists(final):  # a re-run that reached the same step: replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(os.path.join(run_dir, LATEST), iter_dir_name(step) + "\n")
        keep = stage.training.keep_last
        for name in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    _barrier()
    return final


# ------------------------------------------------------------------------ load
def load_model_weights(path: str, model, groups) -> None:
    """Load only the model tensors of training checkpoint `path` into `model` (any TP size)."""
    state = _dist_load({"model": model_sharded_state_dict(model, groups)},
                       os.path.join(path, DIST_DIR))
    _load_model_state(model, state["model"], path)


def _dist_load(template, directory: str):
    """megatron's `dist_checkpointing.load`, without the FutureWarnings its torch strategy
    triggers in torch.distributed.checkpoint (ShardedTensor, `load_state_dict`): they are about
    megatron-core's own calls, nothing a user of this project can change, and they buried the
    demo's output. Other warnings still show."""
    from megatron.core import dist_checkpointing

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning,
                                module=r"(torch\.distributed\.checkpoint|megatron\.core)\.")
        return dist_checkpointing.load(template, directory)


def _load_model_state(model, state, path: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"training checkpoint {path!r} does not match the model: missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")


@dataclass
class DataResume:
    """How a resumed run's data pipeline continues (`data_resume`)."""

    order: StreamOrder  # the sample order to build the pipeline with
    state: Optional[Dict[str, Any]]  # this dp rank's pipeline state to load (same dp size)
    rejected: Dict[str, int]  # skipped samples of the whole old run (dp size changed)
    dp_changed: bool
    stream: Optional[str] = None  # fingerprint of the mixture stream the old run read


def data_resume(path: str, groups) -> Optional[DataResume]:
    """The data position checkpoint `path` gives this rank (None: the checkpoint has none, or
    predates per-dp-rank data files and was written at another dp size: the data restarts).

    At the dp size it was written at, each dp rank continues its own stream. At another, the
    new ranks divide `continue_order` of the old ranks' positions: no sample repeated or lost."""
    meta = read_training_meta(path)
    order = StreamOrder.from_state(meta.get("data_order"))
    saved_dp = int(meta["layout"]["dp"])
    files = [os.path.join(path, data_file(r)) for r in range(saved_dp)]
    if not all(os.path.isfile(f) for f in files):
        return _legacy_data_resume(path, groups, saved_dp)
    if saved_dp == groups.dp_size:
        return DataResume(order, torch.load(files[groups.dp_rank], weights_only=False), {},
                          dp_changed=False)
    states = [torch.load(f, weights_only=False) for f in files]
    rejected: Dict[str, int] = {}
    for state in states:
        for reason, count in state["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + int(count)
    return DataResume(continue_order(order, states), None, rejected, dp_changed=True,
                      stream=states[0]["stream"].split("/")[0])


def restore_data_position(path: str, pipeline, groups, data: DataResume) -> None:
    """Put `data` (`data_resume(path, groups)`) into `pipeline`, built with `data.order`: this
    dp rank's saved state at the same dp size; at another, a fresh position in the carried
    order that keeps the old run's skipped-sample counts (on dp rank 0, so their sum over dp
    stays the run's total)."""
    if data.state is not None:
        pipeline.load_state_dict(data.state)  # checks the stream, shard and packer
        return
    current = pipeline.shard.stream.fingerprint()
    if data.stream != current:
        raise CheckpointError(
            f"{path}: its data position belongs to another data stream (mixture "
            f"{data.stream}, now {current}): did 'data.mixture' or 'data.seed' change?")
    if groups.dp_rank == 0:
        pipeline.rejected.update(data.rejected)


def _legacy_data_resume(path: str, groups, saved_dp: int) -> Optional[DataResume]:
    """Checkpoints without data_dp files: the rank file's position, at the same layout only."""
    rank_file = os.path.join(path, f"rank_{_rank():05d}.pt")
    if saved_dp != groups.dp_size or not os.path.isfile(rank_file):
        return None
    state = torch.load(rank_file, weights_only=False)
    if state.get("data") is None or state.get("dp_rank") != groups.dp_rank:
        return None
    return DataResume(StreamOrder(), state["data"], {}, dp_changed=False)


def load_training_checkpoint(path: str, *, model, optimizer, scheduler, pipeline, groups,
                             backend, data: Optional[DataResume] = None) -> Dict[str, Any]:
    """Restore model, optimizer, scheduler, data position and RNG from checkpoint `path`
    (written at any TP / DP size). `data` is `data_resume(path, groups)`, whose order
    `pipeline` was built with. The RNG states need the same layout; otherwise they start fresh
    (`resharded` in the returned per-rank state, which also holds step and counters).

    Each rank reads the per-rank file of its own global rank; a checkpoint written by fewer
    ranks gives the missing ranks rank 0's scheduler state (identical on every rank)."""
    meta = read_training_meta(path)
    _torch_adam_fixups(optimizer)
    model_state = model_sharded_state_dict(model, groups)
    template = {"model": model_state,
                "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True,
                                                          metadata=OPTIMIZER_FORMAT)}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is not None:  # let megatron allocate the state it loads into
            inner.state.clear()
    state = _dist_load(template, os.path.join(path, DIST_DIR))
    _load_model_state(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(optimizer)
    rank_file = os.path.join(path, f"rank_{_rank():05d}.pt")
    if not os.path.isfile(rank_file) and meta["world_size"] <= _rank():
        rank_file = os.path.join(path, "rank_00000.pt")
    layout = groups.layout
    same_layout = meta["world_size"] == layout.world_size and meta["layout"] == {
        "tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp,
        "sequence_parallel": layout.sequence_parallel}
    if not os.path.isfile(rank_file):
        raise CheckpointError(f"{rank_file} is missing: the checkpoint is incomplete")
    rank_state = torch.load(rank_file, weights_only=False)
    scheduler.load_state_dict(rank_state["scheduler"])
    rank_state["resharded"] = not same_layout
    if pipeline is not None and data is not None:
        restore_data_position(path, pipeline, groups, data)
    if same_layout:  # RNG states only at the same layout
        set_rng_state(backend, rank_state["rng"])
    return rank_state
