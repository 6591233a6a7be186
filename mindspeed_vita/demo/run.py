"""`mindspeed-vita demo`: Long-VITA's four training stages, tiny, on the synthetic dataset.

1. writes the tiny tokenizer and the synthetic dataset (coloured shapes, comics, videos, text;
   a held-out split of images never trained on) under `--out`/data;
2. trains the four demo stages (configs/demo/stage1..4.yaml) one after the other with
   `mindspeed-vita train` under torchrun (`--nproc` processes, 2 by default: data parallel in
   stages 1-2, context parallel CP 2 in the long stages 3-4), each starting from the previous
   stage's final weights (stage 1 from random weights); each stage's checkpoints, metrics.jsonl
   and loss.png go to `--out`/stageN;
3. evaluates the trained model and the untrained one on held-out colour / shape / count
   questions (`demo.evaluate`), next to chance;
4. generates from a real photo (scikit-image's astronaut) and a synthetic video with the
   trained checkpoint;
5. writes `demo_summary.json` under `--out`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import resources

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the tiny model's config, package data (found in an editable or a regular install alike)
TINY_MODEL_RESOURCE = "tiny_model.yaml"
#: demo stage -> parallel overrides when run on 2+ processes (CP 2 in the long stages)
LONG_STAGES = (3, 4)
#: synthetic images: 900 to train on, 100 held out (the demo evaluates all 100 by default).
#: 3000 pictures did not help within the budget: the full demo gave held-out colour 28% (57%
#: with 1000), shape 36%, and took 923 s instead of 748 s
N_SINGLE_IMAGES = 1000
#: the demo's one change to the paper's mixture: image QA weighs 3 in stage 2 (the paper: 1, like
#: captions, video QA and short text), so the tiny model, which starts from random weights
#: instead of a pretrained ViT and LLM, sees enough visual questions in its stage-2 steps to
#: answer held-out ones (measured at 800 steps: count 38% -> 62%, chance 33%)
DEMO_STAGE_RATIOS = {"image_qa": (0.0, 3.0, 0.1, 0.1)}


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


def stage_command(n: int, out: str, *, nproc: int, steps, seq_length, backend) -> list:
    """The `mindspeed-vita train` command line of demo stage `n` (under torchrun when nproc > 1)."""
    data = os.path.join(out, "data")
    args = [os.path.join(REPO, "configs", "demo", f"stage{n}.yaml"),
            f"data.mixture={os.path.join(data, f'stage{n}.yaml')}",
            f"model.tokenizer={os.path.join(data, 'tokenizer')}",
            f"training.save={os.path.join(out, f'stage{n}')}", "training.log_interval=5"]
    if n > 1:
        args.append(f"training.load={os.path.join(out, f'stage{n - 1}')}")
    if nproc > 1 and n in LONG_STAGES:
        args.append(f"parallel.cp={nproc}")
    if steps:
        args.append(f"training.train_iters={steps}")
    if seq_length:
        args.append(f"data.seq_length={seq_length}")
    if backend:
        args += ["--backend", backend]
    if nproc == 1:
        return [sys.executable, "-m", "mindspeed_vita.cli", "train", *args]
    from mindspeed_vita.parallel.process_groups import _free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", "-m", "mindspeed_vita.cli", "train", *args]


def _run_stage(cmd: list, n: int) -> None:
    """Run one stage, echoing its progress lines as they come."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if line.startswith("[train]") or "error" in line.lower():
            print(f"[demo]     {line.rstrip()}", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"demo stage {n} failed (exit {proc.returncode}):\n{''.join(tail)}")


def run(args) -> int:
    from mindspeed_vita.data.synth import write_synthetic_dataset
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer
    from mindspeed_vita.training.metrics import read_metrics

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    nproc = int(getattr(args, "nproc", None) or 2)
    t0 = time.perf_counter()
    data = os.path.join(out, "data")
    print(f"[demo] 1/4 tokenizer and synthetic data -> {data}", flush=True)
    paths = write_synthetic_dataset(data, seed=0, n_single=N_SINGLE_IMAGES,
                                    stage_ratios=DEMO_STAGE_RATIOS)
    build_tiny_tokenizer(os.path.join(data, "tokenizer"))
    summary = {"processes": nproc, "stages": {}}
    for n in (1, 2, 3, 4):
        print(f"[demo] 2/4 stage {n}/4 on {nproc} process(es)"
              + (f" (CP {nproc})" if nproc > 1 and n in LONG_STAGES else ""), flush=True)
        start = time.perf_counter()
        _run_stage(stage_command(n, out, nproc=nproc, steps=args.steps,
                                 seq_length=args.seq_length, backend=args.backend), n)
        rows = read_metrics(os.path.join(out, f"stage{n}", "metrics.jsonl"))
        summary["stages"][n] = {"steps": len(rows), "first_loss": rows[0]["loss"],
                                "last_loss": rows[-1]["loss"],
                                "seconds": round(time.perf_counter() - start, 1),
                                "checkpoint": os.path.join(out, f"stage{n}")}
    summary["losses"] = [r["loss"] for n in (1, 2, 3, 4)
                         for r in read_metrics(os.path.join(out, f"stage{n}", "metrics.jsonl"))]
    summary.update(_evaluate_and_generate(out, paths, args))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"[demo] done in {summary['seconds']} s; summary in {out}/demo_summary.json")
    return 0


def _evaluate_and_generate(out: str, paths, args) -> dict:
    """Held-out accuracy (trained vs untrained vs chance) and generation, in this process."""
    import torch

    from backends import get_backend
    from mindspeed_vita.demo.evaluate import accuracy, chance, heldout_questions
    from mindspeed_vita.inference.engine import Generator
    from mindspeed_vita.models.build import build_model, load_pretrained
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    backend = get_backend(args.backend)
    groups = initialize_parallel(backend, ParallelLayout(), seed=42)
    result = {}
    try:
        questions = heldout_questions(os.path.join(out, "data"))
        limit = getattr(args, "eval_images", None)
        if limit:
            images = sorted({q.image for q in questions})[:limit]
            questions = [q for q in questions if q.image in images]
        print(f"[demo] 3/4 held-out accuracy on {len(questions)} questions about "
              f"{len({q.image for q in questions})} unseen images", flush=True)
        trained, tokenizer, cfg = load_pretrained(os.path.join(out, "stage4"), backend,
                                                  groups=groups)
        torch.manual_seed(42)  # the untrained model: stage 1's initialisation
        untrained = build_model(cfg, backend, groups=groups, tokenizer=tokenizer)
        table = {"chance": chance(questions),
                 "untrained": accuracy(untrained, tokenizer, cfg, questions),
                 "trained": accuracy(trained, tokenizer, cfg, questions)}
        print("[demo]     question   chance  untrained  trained", flush=True)
        for kind in table["chance"]:
            print(f"[demo]     {kind:<9} {table['chance'][kind]:7.1%} "
                  f"{table['untrained'][kind]:9.1%} {table['trained'][kind]:8.1%}", flush=True)
        result["heldout_accuracy"] = table
        print("[demo] 4/4 generate with the trained checkpoint (KV cache)", flush=True)
        generator = Generator(trained, tokenizer)
        photo = generator.generate("Describe the picture.", [_demo_photo(out)],
                                   max_new_tokens=args.max_new_tokens)
        video_path = sorted(os.listdir(os.path.join(out, "data", "videos")))[0]
        video = generator.generate("<video>\nWhat happens in the video?", videos=[
            os.path.join(out, "data", "videos", video_path)], max_new_tokens=args.max_new_tokens)
        for name, gen in (("photo", photo), ("video", video)):
            print(f"[demo]     {name}: {gen.prompt_tokens} prompt tokens -> {gen.text!r}",
                  flush=True)
            result[f"generation_{name}"] = {"prompt_tokens": gen.prompt_tokens,
                                            "token_ids": gen.token_ids, "text": gen.text}
        result["generation"] = result["generation_photo"]
    finally:
        destroy_parallel()
    return result
