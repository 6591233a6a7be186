"""`mindspeed-vita demo`: the whole stack, tiny, end to end, on whatever backend is selected.

1. builds the tiny tokenizer and the synthetic dataset (images, comics, videos, text);
2. builds the tiny Long-VITA model (`tiny_model.yaml`, shipped in this package: the same as
   configs/model/tiny.yaml) on megatron-core;
3. streams the synthetic stage-2 mixture through the data pipeline (render + reset packing) and
   runs a few optimizer steps on the packed batches, printing the loss of each step;
4. renders a request with a real photo (scikit-image's astronaut) and generates greedily with
   the KV cache;
5. writes `demo_summary.json` (and `metrics.jsonl`, one line per step) under `--out`.
The weights are random, so the generated text is noise; the point is that every stage runs.
"""
from __future__ import annotations

import functools
import json
import os
import time
from importlib import resources

import torch
import yaml

#: the tiny model's config, package data (found in an editable or a regular install alike)
TINY_MODEL_RESOURCE = "tiny_model.yaml"


def tiny_model_config() -> dict:
    """The raw model section of the tiny demo model, read from the installed package."""
    text = resources.files("mindspeed_vita.demo").joinpath(TINY_MODEL_RESOURCE).read_text("utf-8")
    return yaml.safe_load(text)


def _demo_photo(out_dir: str) -> str:
    """A real photograph shipped with scikit-image (no download), else a drawn picture."""
    from PIL import Image, ImageDraw

    path = os.path.join(out_dir, "photo.png")
    try:
        from skimage import data as skdata

        Image.fromarray(skdata.astronaut()).save(path)
    except ImportError:  # scikit-image is a dev extra; draw something instead
        img = Image.new("RGB", (640, 480), "skyblue")
        ImageDraw.Draw(img).ellipse((200, 120, 440, 360), fill="orange")
        img.save(path)
    return path


def run(args) -> int:
    from mindspeed_vita.config.backend_select import backend_for_stage
    from mindspeed_vita.config.loader import build_config
    from mindspeed_vita.data.loader import pipeline_from_config
    from mindspeed_vita.data.render import render_sample
    from mindspeed_vita.data.synth import write_synthetic_dataset
    from mindspeed_vita.data.tokenizer import load_tokenizer
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer
    from mindspeed_vita.inference.engine import Generator
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.process_groups import (destroy_parallel, initialize_parallel,
                                                        launch_world_size)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[demo] 1/4 tokenizer and synthetic data -> {out}", flush=True)
    tokenizer = load_tokenizer(build_tiny_tokenizer(os.path.join(out, "tokenizer")))
    paths = write_synthetic_dataset(os.path.join(out, "data"), seed=0)
    tiny_model = tiny_model_config()
    stage = build_config({
        "name": "demo", "model": tiny_model,
        "data": {"mixture": paths["stage2"], "seq_length": args.seq_length, "packing": "reset",
                 "num_workers": 0, "max_num_frame": 8, "max_frames": 32},
    }, source="demo")

    layout = stage.check_world_size(launch_world_size())  # refused here, before any group starts
    backend = backend_for_stage(stage, args.backend)
    groups = initialize_parallel(backend, layout, seed=1234)
    summary = {"backend": backend.name}
    try:
        print(f"[demo] 2/4 tiny Long-VITA on backend '{backend.name}'", flush=True)
        model = LongVitaModel(stage.model, backend, groups=groups,
                              context_token_ids=tokenizer.context_token_ids)
        n_params = sum(p.numel() for p in model.parameters())
        summary["parameters"] = n_params
        print(f"[demo]     {n_params:,} parameters", flush=True)

        render = functools.partial(render_sample, tokenizer=tokenizer, model_cfg=stage.model,
                                   max_num_frame=stage.data.max_num_frame,
                                   max_images=stage.data.max_images,
                                   max_frames=stage.data.max_frames)
        pipeline = pipeline_from_config(stage, render_fn=render,
                                        pad_id=tokenizer.pad_id,
                                        context_token_ids=tokenizer.context_token_ids,
                                        layout=layout, dp_rank=groups.dp_rank,
                                        dp_size=groups.dp_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        print(f"[demo] 3/4 {args.steps} steps on packed {args.seq_length}-token batches "
              f"(reset mode)", flush=True)
        losses = []
        with open(os.path.join(out, "metrics.jsonl"), "w") as metrics:
            batches = iter(pipeline)
            for step in range(1, args.steps + 1):
                batch = next(batches)
                start = time.perf_counter()
                loss_sum, count = model(model.build_inputs(batch))
                loss = loss_sum / count.clamp(min=1)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                elapsed = time.perf_counter() - start
                losses.append(loss.item())
                record = {"step": step, "loss": float(loss.detach()), "label_tokens": int(count),
                          "real_tokens": batch.num_real_tokens, "samples": len(batch.samples),
                          "step_time_s": round(elapsed, 4),
                          "tokens_per_s": round(batch.tokens.numel() / elapsed, 1)}
                metrics.write(json.dumps(record) + "\n")
                print(f"[demo]     step {step}/{args.steps} loss {loss.item():.4f} "
                      f"({len(batch.samples)} samples, {batch.num_real_tokens} real tokens, "
                      f"{record['tokens_per_s']:.0f} tok/s)", flush=True)
        summary["losses"] = losses
        summary["packing"] = pipeline.stats()

        print("[demo] 4/4 generate from a real photo with the KV cache", flush=True)
        model.eval()
        gen = Generator(model, tokenizer)
        result = gen.generate("Describe the picture.", [_demo_photo(out)],
                              max_new_tokens=args.max_new_tokens)
        summary["generation"] = {"prompt_tokens": result.prompt_tokens,
                                 "token_ids": result.token_ids, "text": result.text}
        print(f"[demo]     prompt {result.prompt_tokens} tokens -> {len(result.token_ids)} new "
              f"tokens: {result.text!r}", flush=True)
    finally:
        destroy_parallel()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"[demo] done in {summary['seconds']} s; summary in {out}/demo_summary.json")
    return 0
