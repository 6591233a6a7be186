"""`mindspeed-vita bench train`: tokens/s of our training step against a `transformers`
`InternVLForConditionalGeneration` training step, and of packed against padded batches for us,
on the same tiny model, the same weights and the same samples, in one run.

Data: the synthetic mixture of one stage (`data.synth`, written to a temporary directory) is
rendered and packed by our pipeline (`DataPipeline`, reset packing, rows of `--seq-length`).
Each step takes the samples of `--micro-batch-size` packed rows; all three runs train exactly
those samples, so every run sees the same real (non-pad) tokens per step:

* ours, packed: the packed rows as they come (one micro batch, varlen attention per sample);
* ours, padded: one row per sample, right-padded to the step's longest sample;
* transformers, padded: the same padded batch with its attention mask and labels (-100 on
  padding), every visual context token given the model's `image_token_id`.

Model: `configs/model/tiny.yaml` with the InternVL projector and image layout (transformers
has no Long-VITA projector), float32. Our model is built once (seeded); each run starts from a
copy of its weights, the transformers model through `convert.hf_internvl.native_to_internvl`,
so the three runs start from identical weights: each run's weights, read back in our naming
(the transformers model's through `internvl_to_native`), have the digest of the original, and
the first losses agree to fp32 rounding.
Optimisation is the same on both sides: Adam(W) with the same lr, betas and eps, no weight
decay, gradient clipping at 1.0, constant lr. Ours is `training.step.train_step` (megatron DDP,
megatron optimizer and scheduler, gradient finalisation: what `mindspeed-vita train` runs).

Timing: one process (spawned, so its torch.distributed world is its own); the three runs take
their steps interleaved (step i of each run, in a rotating order) so load from other processes
on the machine hits them alike. The first `--warmup` steps are not timed; tokens/s is the
median over the timed steps of real tokens / step time (after `backend.synchronize()`). Peak
memory is the backend's (allocator peak on an accelerator, peak-RSS growth on CPU), the
largest growth of one step above what was live before it, taken on the warmup steps after the
first (on CPU the garbage collection and the peak reset it needs would slow the timed steps).
"""
from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List, Sequence

from mindspeed_vita.bench.common import format_bytes, format_table, print_json
from mindspeed_vita.bench.spawn import run_group
from mindspeed_vita.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = ("ours-packed", "ours-padded", "transformers-padded")
#: ratios printed, as (name, numerator run, denominator run)
RATIOS = (("ours_packed_vs_transformers", "ours-packed", "transformers-padded"),
          ("ours_padded_vs_transformers", "ours-padded", "transformers-padded"),
          ("packed_vs_padded_ours", "ours-packed", "ours-padded"))
ADAM = dict(betas=(0.9, 0.999), eps=1e-8)
CLIP_GRAD = 1.0
#: samples after which `prepare_steps` gives up when most were too long for a row
OVERLONG_CHECK_AFTER = 64
#: attention of the transformers model: its own default, named so the report can say it
TRANSFORMERS_ATTENTION = "sdpa"


# ------------------------------------------------------------------------------ model


def bench_model_config():
    """The tiny model (configs/model/tiny.yaml) with the InternVL projector and image layout,
    float32: the shape transformers' InternVL can run."""
    import yaml

    from mindspeed_vita.config.model import ModelConfig

    with open(os.path.join(REPO, "configs", "model", "tiny.yaml"), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["projector"]["variant"] = "internvl"
    raw["image_layout"] = "internvl"
    raw["params_dtype"] = "float32"
    return ModelConfig.model_validate(raw)


def tensor_state(model) -> Dict[str, Any]:
    """Host copies of a module's tensors (megatron's non-tensor `_extra_state` left out)."""
    import torch

    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def state_digest(state: Dict[str, Any]) -> str:
    """sha256 over the names, shapes and bytes of a state dict's tensors, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def relative_change(before: Dict[str, Any], after: Dict[str, Any]) -> float:
    """||after - before|| / ||before|| over every tensor of two state dicts with the same keys."""
    import torch

    diff = sum(float(torch.sum((after[k].double() - before[k].double()) ** 2)) for k in before)
    norm = sum(float(torch.sum(before[k].double() ** 2)) for k in before)
    return math.sqrt(diff / norm) if norm else 0.0


# ------------------------------------------------------------------------------- data


def padded_batch(samples: Sequence, pad_id: int):
    """The `PackedBatch` of `samples` (RenderedSamples), one row each, right-padded to the
    longest with `pad_id` (label -100); positions 0..s-1 per row, no `cu_seqlens` (causal
    attention over the row: padding after the real tokens is invisible to them)."""
    import torch

    from mindspeed_vita.data.types import IGNORE_INDEX, PackedBatch

    longest = max(s.num_tokens for s in samples)
    tokens = torch.full((len(samples), longest), pad_id, dtype=torch.int64)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.int64)
    for row, sample in enumerate(samples):
        tokens[row, :sample.num_tokens] = sample.input_ids
        labels[row, :sample.num_tokens] = sample.labels
    pixels = [s.pixel_values for s in samples if s.pixel_values.numel()]
    return PackedBatch(
        tokens=tokens, labels=labels,
        position_ids=torch.arange(longest).repeat(len(samples), 1),
        pixel_values=torch.cat(pixels) if pixels else samples[0].pixel_values,
        samples=[(s.source, s.line) for s in samples],
        num_real_tokens=sum(s.num_tokens for s in samples))


def prepare_steps(model_cfg, tokenizer, mixture: str, *, steps: int, seq_length: int,
                  micro_batch_size: int, seed: int) -> List[Dict[str, Any]]:
    """`steps` steps of data, each `{"packed": PackedBatch of micro_batch_size packed rows,
    "padded": the same samples padded (`padded_batch`), "lengths": their token counts}`.
    Rendering and packing are the training pipeline's (`data.*` defaults, reset packing)."""
    import functools

    from mindspeed_vita.config.schema import DataConfig
    from mindspeed_vita.data.loader import DataPipeline, parse_record
    from mindspeed_vita.data.mixture import MixtureConfig, MixtureStream
    from mindspeed_vita.data.packing import Packer, packer_for
    from mindspeed_vita.data.render import render_sample
    from mindspeed_vita.parallel.layout import ParallelLayout

    rendered: Dict[tuple, Any] = {}

    class RecordingPacker(Packer):
        """Our packer, keeping every sample it is given by (source, line) (rendering is
        deterministic, so a record seen twice renders the same)."""

        def add(self, position, sample) -> None:
            rendered[(sample.source, sample.line)] = sample
            super().add(position, sample)
            # the stream is endless: rows too short for most samples would never fill the steps
            seen, dropped = position + 1, self.stats.dropped_overlong
            if seen >= OVERLONG_CHECK_AFTER and 2 * dropped > seen:
                raise UserInputError(
                    f"--seq-length {seq_length}: {dropped} of the first {seen} samples of "
                    f"{mixture} are longer than a row; raise --seq-length")

    data = DataConfig(mixture=mixture, seq_length=seq_length, packing="reset", seed=seed,
                      num_workers=0)
    stream = MixtureStream(MixtureConfig.from_yaml(mixture), seed=seed)
    packer = packer_for(ParallelLayout(), data, pad_id=tokenizer.pad_id,
                        context_token_ids=tokenizer.context_token_ids,
                        tokens_per_unit=model_cfg.tokens_per_tile, packer_class=RecordingPacker)
    render = functools.partial(render_sample, tokenizer=tokenizer, model_cfg=model_cfg,
                               max_num_frame=data.max_num_frame, max_images=data.max_images,
                               max_frames=data.max_frames, max_tiles=data.max_tiles)
    pipeline = DataPipeline(stream, stream.read, parse_record, render, packer, num_workers=0,
                            micro_batch_size=micro_batch_size,
                            logger=logging.getLogger("mindspeed_vita.bench.train"))
    out = []
    for packed in pipeline:
        samples = [rendered[key] for key in packed.samples]
        out.append({"packed": packed, "padded": padded_batch(samples, tokenizer.pad_id),
                    "lengths": [s.num_tokens for s in samples]})
        if len(out) == steps:
            return out
    raise AssertionError("unreachable: the pipeline is endless")


def _batch_to_dict(batch) -> Dict[str, Any]:
    return {k: getattr(batch, k) for k in ("tokens", "labels", "position_ids", "pixel_values",
                                           "cu_seqlens", "samples", "num_real_tokens")}


def _batch_from_dict(d: Dict[str, Any]):
    from mindspeed_vita.data.types import PackedBatch

    return PackedBatch(**d)


# ------------------------------------------------------------------------- the runs


class _OurRun:
    """Our training step: LongVitaModel + megatron DDP + megatron optimizer + scheduler."""

    def __init__(self, cfg, backend, groups, context_ids, state, lr: float, steps: int):
        import torch
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig)

        from mindspeed_vita.config.schema import TrainingConfig
        from mindspeed_vita.models.vlm import LongVitaModel
        from mindspeed_vita.training.optimizer import build_optimizer, build_scheduler

        self.groups = groups
        self.model = LongVitaModel(cfg, backend, groups=groups, context_token_ids=context_ids)
        self.model.load_state_dict(state)
        training = TrainingConfig(
            lr=lr, min_lr=lr, lr_decay_style="constant", warmup_fraction=0.0, weight_decay=0.0,
            adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1], adam_eps=ADAM["eps"],
            clip_grad=CLIP_GRAD, train_iters=steps, global_batch_size=1, micro_batch_size=1)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=training.distributed_optimizer)
        self.ddp = DistributedDataParallel(self.model.language.config, ddp_config, self.model)
        self.optimizer = build_optimizer(self.ddp, training, params_dtype=torch.float32,
                                         num_vision_layers=cfg.vision.num_layers,
                                         distributed=training.distributed_optimizer)
        self.scheduler = build_scheduler(self.optimizer, training)

    def step(self, batch) -> float:
        from mindspeed_vita.training.step import train_step

        return train_step(model=self.model, ddp_model=self.ddp, optimizer=self.optimizer,
                          scheduler=self.scheduler, batches=[batch], groups=self.groups).loss

    def loss(self, batch) -> float:
        import torch

        with torch.no_grad():
            terms = self.ddp(self.model.build_inputs(batch))
        return float(terms.mean())

    def state(self) -> Dict[str, Any]:
        return tensor_state(self.model)


class _TransformersRun:
    """transformers' InternVLForConditionalGeneration, trained the usual way: forward with
    labels, backward, clip, torch AdamW."""

    def __init__(self, cfg, backend, native_state, image_token_id: int, context_ids,
                 lr: float):
        import torch
        from transformers import InternVLForConditionalGeneration

        from mindspeed_vita.convert.hf_internvl import (
            HUB_PREFIXES, MODULE_PREFIXES, internvl_config_from_model_config,
            native_to_internvl)

        config = internvl_config_from_model_config(cfg, image_token_id=image_token_id)
        self.model = InternVLForConditionalGeneration(config).to(
            device=backend.device(), dtype=torch.float32).train()
        self.model.set_attn_implementation(TRANSFORMERS_ATTENTION)
        hub = native_to_internvl(native_state, cfg)
        # the converter writes the on-disk spelling; the module's own names differ by prefix
        renamed = {}
        for key, tensor in hub.items():
            part = next(p for p, prefix in HUB_PREFIXES.items() if key.startswith(prefix))
            renamed[MODULE_PREFIXES[part] + key[len(HUB_PREFIXES[part]):]] = tensor
        self.model.load_state_dict(renamed, strict=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, **ADAM)
        self.cfg = cfg
        self.device = backend.device()
        self.image_token_id = image_token_id
        self.context_ids = torch.tensor(sorted(context_ids))

    def inputs(self, padded) -> Dict[str, Any]:
        """Keyword arguments of the model for a padded step (`prepare_steps`' "padded" and
        "lengths")."""
        import torch

        batch = padded["padded"]
        tokens = batch.tokens
        # every visual context token (image, patch, video) is a feature row for transformers
        tokens = torch.where(torch.isin(tokens, self.context_ids),
                             torch.full_like(tokens, self.image_token_id), tokens)
        mask = torch.zeros_like(tokens)
        for row, n in enumerate(padded["lengths"]):
            mask[row, :n] = 1
        inputs = {"input_ids": tokens.to(self.device), "attention_mask": mask.to(self.device),
                  "labels": batch.labels.to(self.device)}
        if batch.pixel_values.numel():
            inputs["pixel_values"] = batch.pixel_values.to(self.device, torch.float32)
        return inputs

    def step(self, padded) -> float:
        import torch

        out = self.model(**self.inputs(padded))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_GRAD)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def loss(self, padded) -> float:
        import torch

        with torch.no_grad():
            return float(self.model(**self.inputs(padded)).loss)

    def state(self) -> Dict[str, Any]:
        """The weights in our naming (through the converter), to compare with ours."""
        from mindspeed_vita.convert.hf_internvl import internvl_to_native

        return internvl_to_native(tensor_state(self.model), self.cfg)


# ------------------------------------------------------------------------ the process


def _body(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    from mindspeed_vita import startup

    startup.prepare(verbose=cfg["verbose"])  # this process's third-party noise, as in the CLI
    import torch

    from backends import get_backend
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    torch.set_num_threads(cfg["threads"])
    backend = get_backend(cfg["backend"])
    groups = initialize_parallel(backend, ParallelLayout(), seed=cfg["seed"])
    try:
        data = torch.load(cfg["data_file"], weights_only=False)
        steps = [{"packed": _batch_from_dict(s["packed"]), "padded": _batch_from_dict(s["padded"]),
                  "lengths": s["lengths"]} for s in data["steps"]]
        model_cfg = bench_model_config()
        context_ids = data["context_ids"]
        initial = tensor_state(LongVitaModel(model_cfg, backend, groups=groups,
                                             context_token_ids=context_ids))
        runs = {
            "ours-packed": _OurRun(model_cfg, backend, groups, context_ids, initial, cfg["lr"],
                                   len(steps)),
            "ours-padded": _OurRun(model_cfg, backend, groups, context_ids, initial, cfg["lr"],
                                   len(steps)),
            "transformers-padded": _TransformersRun(model_cfg, backend, initial,
                                                    data["image_token_id"], context_ids,
                                                    cfg["lr"]),
        }
        start_states = {name: run.state() for name, run in runs.items()}

        def step_input(name: str, step: Dict[str, Any]):
            if name == "ours-packed":
                return step["packed"]
            return step["padded"] if name == "ours-padded" else step

        results: Dict[str, Dict[str, Any]] = {
            name: {"times": [], "losses": [], "peak_bytes": None} for name in runs}
        # peak memory on the warmup steps after the first (the first one also allocates the
        # optimizer state): the timed steps run without the collection and the peak reset
        memory_steps = range(1 if cfg["warmup"] > 1 else 0, cfg["warmup"])
        for index, step in enumerate(steps):
            # rotate the order so that no run always follows the same neighbour
            shift = index % len(RUNS)
            for name in RUNS[shift:] + RUNS[:shift]:
                record = results[name]
                if index in memory_steps:
                    gc.collect()
                    backend.synchronize()
                    backend.reset_peak_memory_stats()
                    base = backend.max_memory_allocated()
                backend.synchronize()
                start = time.perf_counter()
                loss = runs[name].step(step_input(name, step))
                backend.synchronize()
                seconds = time.perf_counter() - start
                record["losses"].append(loss)
                if index in memory_steps:
                    grown = backend.max_memory_allocated() - base
                    record["peak_bytes"] = max(record["peak_bytes"] or 0, grown)
                if index >= cfg["warmup"]:
                    record["times"].append(seconds)
        for name, run in runs.items():
            record = results[name]
            record["first_batch_loss_after"] = run.loss(step_input(name, steps[0]))
            record["weights_sha256_at_start"] = state_digest(start_states[name])
            record["weights_relative_change"] = relative_change(start_states[name], run.state())
        return {"results": results, "initial_weights_sha256": state_digest(initial),
                "backend": backend.name,
                "parameters": sum(int(t.numel()) for t in initial.values())}
    finally:
        destroy_parallel()


# ------------------------------------------------------------------------------ run


def _write_data(scratch: str, args) -> Dict[str, Any]:
    """Render and pack the steps' data once (in this process) for the benchmark process."""
    import torch

    from mindspeed_vita.data.synth import write_synthetic_dataset
    from mindspeed_vita.data.tokenizer import load_tokenizer
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

    paths = write_synthetic_dataset(os.path.join(scratch, "data"), seed=0)
    tokenizer = load_tokenizer(build_tiny_tokenizer(os.path.join(scratch, "tokenizer")))
    steps = prepare_steps(bench_model_config(), tokenizer, paths[f"stage{args.stage}"],
                          steps=args.warmup + args.steps, seq_length=args.seq_length,
                          micro_batch_size=args.micro_batch_size, seed=args.seed)
    file = os.path.join(scratch, "steps.pt")
    torch.save({"steps": [{"packed": _batch_to_dict(s["packed"]),
                           "padded": _batch_to_dict(s["padded"]), "lengths": s["lengths"]}
                          for s in steps],
                "context_ids": sorted(int(i) for i in tokenizer.context_token_ids),
                "image_token_id": int(tokenizer.img_context_id)}, file)
    return {"file": file, "steps": steps}


def shape_stats(steps: Sequence[Dict[str, Any]], warmup: int) -> Dict[str, Any]:
    """Real tokens, samples and padding of the timed steps' batches."""
    timed = steps[warmup:]
    real = [int(s["packed"].num_real_tokens) for s in timed]
    packed_slots = sum(int(s["packed"].tokens.numel()) for s in timed)
    padded_slots = sum(int(s["padded"].tokens.numel()) for s in timed)
    return {
        "real_tokens_per_step": real,
        "samples_per_step": [len(s["lengths"]) for s in timed],
        "padded_shapes": [list(s["padded"].tokens.shape) for s in timed],
        "packed_shape": list(timed[0]["packed"].tokens.shape),
        "padding_fraction_padded": 1 - sum(real) / padded_slots,
        "padding_fraction_packed": 1 - sum(real) / packed_slots,
    }


def summarise(raw: Dict[str, Any], shapes: Dict[str, Any]) -> Dict[str, Any]:
    """Per-run median tokens/s (real tokens / step time over the timed steps) and the ratios."""
    real = shapes["real_tokens_per_step"]
    runs = {}
    for name in RUNS:
        record = raw["results"][name]
        runs[name] = {"tokens_per_s": statistics.median(n / t for n, t in
                                                        zip(real, record["times"])),
                      "step_s": statistics.median(record["times"]),
                      "step_times_s": record["times"],
                      "peak_bytes": record["peak_bytes"],
                      "losses": record["losses"],
                      "first_batch_loss_after": record["first_batch_loss_after"],
                      "weights_sha256_at_start": record["weights_sha256_at_start"],
                      "weights_relative_change": record["weights_relative_change"]}
    ratios = {name: runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"] for name, a, b in RATIOS}
    per_step = list(zip(*(runs[name]["losses"] for name in RUNS)))  # [step][run]
    spread = [(max(losses) - min(losses)) / abs(min(losses)) for losses in per_step]
    digests = {runs[name]["weights_sha256_at_start"] for name in RUNS}
    return {"runs": runs, "ratios": ratios,
            "first_loss_max_relative_difference": spread[0],
            "loss_max_relative_difference": max(spread),
            "same_initial_weights": digests == {raw["initial_weights_sha256"]}}


def run(args) -> int:
    """Run the benchmark and print its table (or one JSON object)."""
    from backends import resolve_backend_name

    backend = resolve_backend_name(args.backend)
    load_at_start = _load_average()
    with tempfile.TemporaryDirectory(prefix="mindspeed-vita-bench-train-") as scratch:
        data = _write_data(scratch, args)
        cfg = {"data_file": data["file"], "backend": backend, "seed": args.seed, "lr": args.lr,
               "warmup": args.warmup, "threads": args.threads,
               "verbose": bool(getattr(args, "verbose", False))}
        raw = run_group(_body, 1, cfg, timeout=args.timeout, name="bench train")[0]
        shapes = shape_stats(data["steps"], args.warmup)
    summary = {"model": "configs/model/tiny.yaml (projector and image layout: internvl)",
               "dtype": "float32", "backend": raw["backend"], "parameters": raw["parameters"],
               "transformers_attention": TRANSFORMERS_ATTENTION,
               "stage_mixture": args.stage, "seq_length": args.seq_length,
               "micro_batch_size": args.micro_batch_size, "warmup_steps": args.warmup,
               "timed_steps": args.steps, "lr": args.lr, "threads": args.threads,
               "load_average": {"start": load_at_start, "end": _load_average()},
               "initial_weights_sha256": raw["initial_weights_sha256"], **shapes,
               **summarise(raw, shapes)}
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0


def _load_average():
    """The 1-, 5- and 15-minute load averages of the machine (None where there are none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def format_summary(summary: Dict[str, Any]) -> str:
    """The human table of a `run` summary."""
    runs, ratios = summary["runs"], summary["ratios"]
    padded = summary["padded_shapes"]
    rows, cols = summary["packed_shape"]
    padded_text = (f"~{statistics.mean(p[0] for p in padded):.0f} x "
                   f"~{statistics.mean(p[1] for p in padded):.0f} padded")
    batch = {"ours-packed": f"{rows} x {cols} packed", "ours-padded": padded_text,
             "transformers-padded": padded_text}
    padding = {"ours-packed": summary["padding_fraction_packed"],
               "ours-padded": summary["padding_fraction_padded"],
               "transformers-padded": summary["padding_fraction_padded"]}
    load = summary["load_average"]
    head = (f"bench train: {summary['model']}, {summary['dtype']}, "
            f"{summary['parameters']:,} parameters, backend {summary['backend']}, "
            f"{summary['threads']} thread(s)"
            + (f", load average {load['start'][0]:.1f} -> {load['end'][0]:.1f}"
               if load["start"] else "") + "\n"
            f"synthetic stage {summary['stage_mixture']} samples, the same in every run: "
            f"~{statistics.mean(summary['real_tokens_per_step']):.0f} real tokens per step, "
            f"{summary['timed_steps']} timed steps after {summary['warmup_steps']} warmup")
    table = format_table(
        ["run", "batch per step", "padding", "median tok/s", "median step s", "peak mem",
         "step-1 loss", "step-1 batch, after", "weights moved"],
        [(name, batch[name], f"{padding[name]:.1%}", f"{runs[name]['tokens_per_s']:,.0f}",
          f"{runs[name]['step_s']:.3f}",
          "-" if runs[name]["peak_bytes"] is None else format_bytes(runs[name]["peak_bytes"]),
          f"{runs[name]['losses'][0]:.5f}", f"{runs[name]['first_batch_loss_after']:.4f}",
          f"{runs[name]['weights_relative_change']:.1e}") for name in RUNS])
    tail = (f"tokens/s ratios: ours packed / transformers padded "
            f"{ratios['ours_packed_vs_transformers']:.2f}x, ours padded / transformers padded "
            f"{ratios['ours_padded_vs_transformers']:.2f}x, packed / padded (ours) "
            f"{ratios['packed_vs_padded_ours']:.2f}x\n"
            f"identical initial weights in every run: {summary['same_initial_weights']}; "
            f"the runs' losses differ by {summary['first_loss_max_relative_difference']:.1e} at "
            f"step 1, by at most {summary['loss_max_relative_difference']:.1e} over all steps "
            f"(relative)")
    return "\n".join([head, table, "", tail])
