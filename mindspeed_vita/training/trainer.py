"""The training loop of one stage: `run_training(stage)`.

Order of work (every check that can fail on the user's input runs before any process group
starts or any tensor is computed):
1. the layout for this launch's world size, the run directory (writable?), what to start from
   (the latest checkpoint in `training.save` -> exact resume; else `training.load` -> weights
   only, fresh optimizer; else random init) and the tokenizer;
2. process groups seeded with `training.seed`, the model, freezing, megatron DDP, optimizer,
   scheduler, the data pipeline of this data-parallel rank;
3. steps: `gbs / (mbs * dp)` micro batches each, metrics row, checkpoint every
   `save_interval` steps, at the end, on SIGTERM, and when too many steps in a row had a
   NaN/inf loss.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from mindspeed_vita.config.schema import ConfigError, StageConfig

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (too many non-finite losses); a checkpoint was saved."""


@dataclass
class StartPlan:
    """Where a run starts from, decided before any compute."""

    layout: Any
    run_dir: Optional[str]
    resume: Optional[str]  # training checkpoint to resume exactly
    weights: Optional[str]  # training.load source (weights only)
    tokenizer_dir: str


def _check_writable(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"config key 'training.save' = {run_dir!r}: the run directory is not "
                          f"writable ({exc.strerror or exc})") from None


def plan_start(stage: StageConfig, world_size: int) -> StartPlan:
    """Every check of the stage against the launch and the file system, before any compute."""
    from mindspeed_vita.models.build import NATIVE, checkpoint_kind
    from mindspeed_vita.training.checkpointing import (
        TOKENIZER_DIR, is_training_checkpoint, latest_checkpoint, resolve_weights_source)

    layout = stage.check_world_size(world_size)
    fault_rank = stage.training.fault_injection.rank
    if fault_rank is not None and fault_rank >= world_size:
        raise ConfigError(f"config key 'training.fault_injection.rank' = {fault_rank} is not a "
                          f"rank of this launch (world size {world_size})")
    layout.check_language(stage.model.language)
    layout.check_seq_length(stage.data.seq_length)
    if not stage.data.mixture:
        raise ConfigError("config key 'data.mixture' is not set: the stage has no data")
    if not os.path.isfile(stage.data.mixture):
        raise ConfigError(f"config key 'data.mixture' = {stage.data.mixture!r}: no such file")
    run_dir = stage.training.save
    resume = None
    if run_dir:
        _check_writable(run_dir)
        resume = latest_checkpoint(run_dir)
    weights = None
    if resume is None and stage.training.load:
        weights = resolve_weights_source(stage.training.load)
        if not is_training_checkpoint(weights):
            checkpoint_kind(weights)  # CheckpointError naming the path when it is no model
    source = resume or weights
    if stage.model.tokenizer:
        tokenizer_dir = stage.model.tokenizer
    elif source and (is_training_checkpoint(source) or checkpoint_kind(source) == NATIVE):
        tokenizer_dir = os.path.join(source, TOKENIZER_DIR)
    elif source:
        tokenizer_dir = source  # an HF directory holds its tokenizer
    else:
        raise ConfigError("config key 'model.tokenizer' is not set and there is no checkpoint "
                          "to take the tokenizer from ('training.load')")
    if not os.path.isdir(tokenizer_dir):
        raise ConfigError(f"tokenizer directory {tokenizer_dir!r} does not exist "
                          f"(config key 'model.tokenizer' or 'training.load')")
    return StartPlan(layout=layout, run_dir=run_dir, resume=resume, weights=weights,
                     tokenizer_dir=tokenizer_dir)


def _build_model(stage, plan, backend, groups, tokenizer):
    """The model, randomly initialised (seeded) or with the `training.load` weights."""
    from mindspeed_vita.models.build import build_model, load_pretrained
    from mindspeed_vita.training.checkpointing import is_training_checkpoint, load_model_weights

    recompute = stage.training.recompute
    if plan.weights and not is_training_checkpoint(plan.weights):
        update = {"lm_head": stage.model.lm_head, "params_dtype": stage.model.params_dtype,
                  "lm_head_chunk_size": stage.model.lm_head_chunk_size}
        model, _, _ = load_pretrained(plan.weights, backend, groups=groups, recompute=recompute,
                                      config_update=update)
        return model
    model = build_model(stage.model, backend, groups=groups, tokenizer=tokenizer,
                        recompute=recompute)
    if plan.weights:
        load_model_weights(plan.weights, model, groups)
    return model


class _SigtermFlag:
    """SIGTERM sets a flag the loop checks after each step (all ranks agree via all-reduce)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_rank(self, device=None) -> bool:
        """True when any rank got SIGTERM (`device`: where the flag is reduced, see
        `step.all_reduce_values`)."""
        from mindspeed_vita.training.step import all_reduce_values

        world = dist.group.WORLD if dist.is_initialized() else None
        (flag,) = all_reduce_values([1.0 if self.raised else 0.0], world,
                                    op=dist.ReduceOp.MAX, device=device)
        return flag > 0


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_training(stage: StageConfig, *, backend_name: Optional[str] = None,
                 print_fn=print) -> Dict[str, Any]:
    """Train `stage` on this launch (one process or torchrun's world); returns a summary
    (final step, last loss, run directory, checkpoint path). See the module doc."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mindspeed_vita.config.backend_select import backend_for_stage
    from mindspeed_vita.data.loader import pipeline_from_config
    from mindspeed_vita.data.render import render_sample
    from mindspeed_vita.data.tokenizer import load_tokenizer
    from mindspeed_vita.parallel.process_groups import (
        destroy_parallel, initialize_parallel, launch_world_size)
    from mindspeed_vita.training import checkpointing as ckpt
    from mindspeed_vita.training.flops import peak_tflops, step_flops
    from mindspeed_vita.training.metrics import (
        METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR, MetricsWriter)
    from mindspeed_vita.training.optimizer import (
        apply_freezing, build_optimizer, build_scheduler)
    from mindspeed_vita.training.step import all_reduce_values, train_step

    plan = plan_start(stage, launch_world_size())
    training = stage.training
    backend = backend_for_stage(stage, backend_name)
    groups = initialize_parallel(backend, plan.layout, seed=training.seed)
    rank = dist.get_rank()
    say = print_fn if rank == 0 else (lambda *a, **k: None)
    try:
        tokenizer = load_tokenizer(plan.tokenizer_dir)
        model = _build_model(stage, plan, backend, groups, tokenizer)
        counts = apply_freezing(model, training.trainable)
        dtype = getattr(torch, stage.model.params_dtype)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=training.distributed_optimizer)
        ddp_model = DistributedDataParallel(model.language.config, ddp_config, model)
        optimizer = build_optimizer(ddp_model, training, params_dtype=dtype,
                                    num_vision_layers=stage.model.vision.num_layers,
                                    distributed=training.distributed_optimizer)
        scheduler = build_scheduler(optimizer, training)
        render = functools.partial(render_sample, tokenizer=tokenizer, model_cfg=stage.model,
                                   max_num_frame=stage.data.max_num_frame,
                                   max_images=stage.data.max_images,
                                   max_frames=stage.data.max_frames)
        data = ckpt.data_resume(plan.resume, groups) if plan.resume else None
        pipeline = pipeline_from_config(stage, render_fn=render, pad_id=tokenizer.pad_id,
                                        context_token_ids=tokenizer.context_token_ids,
                                        dp_rank=groups.dp_rank, dp_size=groups.dp_size,
                                        order=data.order if data else None)
        step, skipped_steps, in_a_row = 0, 0, 0
        if plan.resume:
            state = ckpt.load_training_checkpoint(
                plan.resume, model=model, optimizer=optimizer, scheduler=scheduler,
                pipeline=pipeline, groups=groups, backend=backend, data=data)
            step = int(state["step"])
            skipped_steps = int(state["counters"].get("skipped_steps", 0))
            in_a_row = int(state["counters"].get("in_a_row", 0))
            note = " (written at another parallel layout: resharded)" \
                if state["resharded"] else ""
            say(f"[train] resuming from {plan.resume} at step {step}{note}", flush=True)
            if data is None:
                say("[train] the checkpoint has no data position for this dp size: the data "
                    "stream starts again from its beginning", flush=True)
            elif data.dp_changed:
                say(f"[train] data position: {len(data.order.carry)} samples the old dp ranks "
                    f"had read but not trained on come first, then the stream from position "
                    f"{data.order.frontier} (none repeated, none lost)", flush=True)
        elif plan.weights:
            say(f"[train] starting from the weights of {plan.weights} (fresh optimizer)",
                flush=True)
        micro_per_step = micro_batches_per_step(training.global_batch_size,
                                                training.micro_batch_size, groups)
        say(f"[train] {stage.name}: {training.train_iters} steps of "
            f"{training.global_batch_size // training.micro_batch_size} micro batch(es) over "
            f"{groups.dp_size} dp (tp={groups.tp_size} cp={groups.cp_size}), "
            f"trainable {', '.join(p for p, n in counts.items() if n)} "
            f"({sum(counts.values()):,} parameters), backend {backend.name}", flush=True)
        uneven = _uneven_micro_batches(training.global_batch_size, training.micro_batch_size,
                                       groups.dp_size)
        if uneven:
            say(f"[train] {uneven}", flush=True)
        run_dir = plan.run_dir
        metrics_path = training.metrics_file or (
            os.path.join(run_dir, METRICS_FILE) if run_dir else None)
        writer = MetricsWriter(metrics_path, enabled=rank == 0, resume_step=step,
                               tensorboard_dir=os.path.join(run_dir, TENSORBOARD_DIR)
                               if run_dir else None)
        peak = peak_tflops(backend.describe().get("device_name"))
        last_checkpoint = plan.resume

        def save():
            if not run_dir:
                return None
            return ckpt.save_training_checkpoint(
                run_dir, step, model=model, ddp_model=ddp_model, optimizer=optimizer,
                scheduler=scheduler, pipeline=pipeline, groups=groups, backend=backend,
                tokenizer=tokenizer, stage=stage,
                counters={"skipped_steps": skipped_steps, "in_a_row": in_a_row})

        device = backend.device()  # where the per-step host numbers are reduced
        faults = training.fault_injection
        injects = faults.rank is None or faults.rank == rank
        batches = iter(pipeline)
        start_time, start_step, loss = time.perf_counter(), step, None
        with _SigtermFlag() as sigterm:
            while step < training.train_iters:
                micro = [next(batches) for _ in range(micro_per_step)]
                result = train_step(
                    model=model, ddp_model=ddp_model, optimizer=optimizer, scheduler=scheduler,
                    batches=micro, groups=groups,
                    poison_loss=injects and step + 1 in faults.nonfinite_loss_steps,
                    poison_grad=injects and step + 1 in faults.nonfinite_grad_steps)
                step += 1
                loss = result.loss
                if result.skipped:
                    skipped_steps += 1
                    in_a_row += 1
                else:
                    in_a_row = 0
                flops = sum(step_flops(stage.model, segment_lengths=_segments(b),
                                       units=int(b.pixel_values.shape[0]),
                                       head_rows=_head_rows(stage, b),
                                       trainable=training.trainable,
                                       recompute=training.recompute)["total"] for b in micro)
                rejected = float(sum(pipeline.rejected.values()))
                flops, rejected = all_reduce_values([flops, rejected], groups.dp,
                                                    device=device)
                tflops = flops / max(result.seconds, 1e-9) / 1e12 / (
                    groups.tp_size * groups.cp_size)
                row = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                       "lr": result.lr, "tokens": result.real_tokens,
                       "label_tokens": result.label_tokens,
                       "tokens_per_s": round(result.real_tokens / max(result.seconds, 1e-9), 1),
                       "step_time_s": round(result.seconds, 4),
                       "skipped_samples": int(rejected), "skipped_steps": skipped_steps,
                       "skipped": result.skip_reason if result.skipped else None,
                       "tflops": round(tflops, 6),
                       "mfu": None if peak is None else round(tflops / peak, 6)}
                writer.write(row)
                if step % training.log_interval == 0 or step == training.train_iters:
                    elapsed = time.perf_counter() - start_time
                    rate = (step - start_step) / max(elapsed, 1e-9)
                    eta = (training.train_iters - step) / max(rate, 1e-9)
                    say(f"[train] step {step}/{training.train_iters} loss {result.loss:.4f} "
                        f"grad {result.grad_norm:.3f} lr {result.lr.get('default', 0.0):.2e} "
                        f"{row['tokens_per_s']:.0f} tok/s {rate * 60:.1f} steps/min "
                        f"ETA {_fmt_time(eta)}"
                        + (f" SKIPPED ({result.skip_reason}, no update)" if result.skipped
                           else ""), flush=True)
                if in_a_row >= training.max_skipped_in_a_row:
                    last_checkpoint = save()
                    writer.close(os.path.join(run_dir, PLOT_FILE) if run_dir else None)
                    raise TrainingStopped(
                        f"{in_a_row} steps in a row were skipped for a non-finite loss or "
                        f"gradient norm (last: {result.skip_reason}; limit "
                        f"'training.max_skipped_in_a_row' = {training.max_skipped_in_a_row}); "
                        f"stopped at step {step}"
                        + (f", checkpoint {last_checkpoint} (the same command resumes from it; "
                           f"lower training.lr or check the data first)"
                           if last_checkpoint else ""))
                stop = sigterm.any_rank(device)
                interval = training.save_interval
                if stop or (interval and step % interval == 0 and step < training.train_iters):
                    last_checkpoint = save()
                    if stop:
                        say(f"[train] SIGTERM: saved {last_checkpoint}, exiting", flush=True)
                        break
        if step >= training.train_iters and (last_checkpoint is None or not
                                             last_checkpoint.endswith(ckpt.iter_dir_name(step))):
            last_checkpoint = save()
        writer.close(os.path.join(run_dir, PLOT_FILE) if run_dir else None)
        if last_checkpoint:
            say(f"[train] checkpoint {last_checkpoint}", flush=True)
        return {"step": step, "loss": loss, "run_dir": run_dir, "checkpoint": last_checkpoint,
                "skipped_steps": skipped_steps, "finished": step >= training.train_iters}
    finally:
        destroy_parallel()


def micro_batches_per_step(global_batch_size: int, micro_batch_size: int, groups) -> int:
    """Micro batches this dp rank runs per step: the global batch's micro batches spread over
    the dp ranks, the first `remainder` ranks taking one more when they do not divide."""
    total = global_batch_size // micro_batch_size
    return total // groups.dp_size + (1 if groups.dp_rank < total % groups.dp_size else 0)


def _uneven_micro_batches(global_batch_size: int, micro_batch_size: int, dp_size: int):
    """A note when the global batch's micro batches do not divide over the dp ranks (the
    paper's 540 rows on 24 dp ranks): which ranks run one more, and that the loss is still
    exact; None when they divide."""
    total = global_batch_size // micro_batch_size
    extra = total % dp_size
    if not extra:
        return None
    ranks = "dp rank 0 runs" if extra == 1 else f"dp ranks 0-{extra - 1} run"
    return (f"{total} micro batches do not divide over dp {dp_size}: {ranks} "
            f"{total // dp_size + 1} per step, the others {total // dp_size} (the loss stays the "
            f"mean over all label tokens of the global batch; a 'training.global_batch_size' "
            f"divisible by micro_batch_size x dp = {micro_batch_size * dp_size} avoids the wait)")


def _segments(batch):
    """Attention segment lengths of a micro batch (packed samples, or whole rows)."""
    if batch.cu_seqlens is not None:
        cu = [int(c) for c in batch.cu_seqlens.tolist()]
        return [b - a for a, b in zip(cu[:-1], cu[1:])]
    b, s = batch.tokens.shape
    return [s] * b


def _head_rows(stage, batch) -> int:
    from mindspeed_vita.training.step import label_count

    if stage.model.lm_head == "logits-masked":
        return label_count(batch)
    return int(batch.tokens.numel())

