"""`mindspeed-vita bench data`: throughput of the training data pipeline and how well it packs.

The synthetic mixture of one stage (written to a temporary directory, or `--data DIR` from
`mindspeed-vita data synth DIR`) streams through the real `DataPipeline`: read, parse, full
render with pixels (tiles and frames decoded, resized and normalised) in `--num-workers` loader
processes, and packing in this process. Reported: records, samples and tokens per second
(wall clock from the first record to the last packed row, worker start-up included) and the
packing utilisation (real tokens / row slots of the finished rows).

Baselines measured on the same samples in the same run, printed as ratios:
* pad-to-longest batching: consecutive batches of `--batch-size` samples, each padded to its
  longest sample; utilisation = real tokens / (B * longest), summed over the batches;
* next-fit packing: the same packer with lookahead 1 (each sample goes into the open row, or
  starts a new one).
Samples the packer drops as overlong are left out of both baselines too.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from mindspeed_vita.bench.common import format_table, print_json
from mindspeed_vita.errors import UserInputError

# --------------------------------------------------------------------------- baselines


def pad_to_longest_utilisation(lengths: Sequence[int], batch_size: int) -> float:
    """Real tokens / padded slots when consecutive `batch_size` samples are padded to their
    longest (the last batch may be smaller); 0.0 for no samples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real = slots = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start:start + batch_size]
        real += sum(batch)
        slots += len(batch) * max(batch)
    return real / slots if slots else 0.0


def simulated_packing_utilisation(lengths: Sequence[int], *, seq_length: int, mode: str, lookahead: int,
                                  pad_multiple: int = 1) -> float:
    """Utilisation of the finished rows of a `Packer` fed text-only samples of `lengths` (in
    order, no end-of-stream flush, as the pipeline measures it)."""
    from mindspeed_vita.data.packing import Packer
    from mindspeed_vita.data.types import RenderedSample

    packer = Packer(seq_length, mode=mode, pad_multiple=pad_multiple, lookahead=lookahead)
    no_pixels = torch.zeros(0, 3, 1, 1)
    for position, length in enumerate(lengths):
        ids = torch.zeros(length, dtype=torch.int64)
        packer.add(position, RenderedSample("bench", position, ids, ids, no_pixels))
        while packer.pop() is not None:
            pass
    return packer.stats.utilisation


# ------------------------------------------------------------------------------- run


def _recording_packer_class():
    from mindspeed_vita.data.packing import Packer

    class LengthRecordingPacker(Packer):
        """The stage's packer, also noting the token count of every sample handed to it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.lengths: List[int] = []

        def add(self, position, sample) -> None:
            self.lengths.append(sample.num_tokens)
            super().add(position, sample)

    return LengthRecordingPacker


def _stage_config(mixture: str, args):
    from mindspeed_vita.config.loader import build_config

    model: Dict[str, Any] = {}
    if args.model_config:
        try:
            with open(args.model_config, encoding="utf-8") as handle:
                model = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserInputError(f"--model-config {args.model_config}: cannot read ({error})") from None
        if not isinstance(model, dict):
            raise UserInputError(f"--model-config {args.model_config}: not a mapping of model keys")
    packing = args.packing or ("reset" if args.stage <= 2 else "joint")
    return build_config({
        "name": "bench-data", "model": model,
        "data": {"mixture": mixture, "seq_length": args.seq_length, "packing": packing,
                 "pack_lookahead": args.pack_lookahead, "seed": args.seed, "num_workers": args.num_workers},
    }, source="bench data")


def measure_pipeline(stage, tokenizer, *, samples: int, batch_size: int,
                     show_progress: bool = False) -> Dict[str, Any]:
    """Stream at least `samples` records of `stage`'s mixture through a full-render
    `DataPipeline`; return throughput, packing utilisation and the two baselines.
    `show_progress`: records consumed so far, on stderr (`mindspeed_vita.progress`)."""
    from mindspeed_vita.progress import progress

    from mindspeed_vita.data.loader import DataPipeline, parse_record
    from mindspeed_vita.data.mixture import MixtureConfig, MixtureStream
    from mindspeed_vita.data.packing import packer_for
    from mindspeed_vita.data.render import render_sample
    from mindspeed_vita.parallel.layout import ParallelLayout

    data = stage.data
    stream = MixtureStream(MixtureConfig.from_yaml(data.mixture), seed=data.seed)
    render = functools.partial(render_sample, tokenizer=tokenizer, model_cfg=stage.model,
                               max_num_frame=data.max_num_frame, max_images=data.max_images,
                               max_frames=data.max_frames, max_tiles=data.max_tiles)
    layout = ParallelLayout.from_config(stage.parallel, world_size=None)
    packer = packer_for(layout, data, pad_id=tokenizer.pad_id,
                        context_token_ids=tokenizer.context_token_ids,
                        tokens_per_unit=stage.model.tokens_per_tile,
                        packer_class=_recording_packer_class())
    pipeline = DataPipeline(stream, stream.read, parse_record, render, packer, num_workers=data.num_workers,
                            prefetch=data.prefetch, logger=logging.getLogger("mindspeed_vita.bench.data"))

    start = time.perf_counter()
    visual_units = 0
    with progress(total=samples, desc="[bench data] records", unit="records",
                  enabled=show_progress) as bar:
        for batch in pipeline:
            visual_units += int(batch.pixel_values.shape[0])
            bar.update(min(pipeline.consumed, samples) - bar.n)
            if pipeline.consumed >= samples:
                break
    elapsed = time.perf_counter() - start

    stats = packer.stats
    kept = [n for n in packer.lengths if n <= data.seq_length or data.on_overlong == "truncate"]
    kept = [min(n, data.seq_length) for n in kept]
    utilisation = {
        "packer": stats.utilisation,
        "next_fit": simulated_packing_utilisation(kept, seq_length=data.seq_length, mode=data.packing,
                                                  lookahead=1, pad_multiple=layout.seq_multiple),
        "pad_to_longest": pad_to_longest_utilisation(kept, batch_size),
    }
    return {
        "records": pipeline.consumed,
        "rejected": dict(pipeline.rejected),
        "samples_packed": stats.samples,
        "rows": stats.rows,
        "real_tokens": stats.real_tokens,
        "rendered_tokens": sum(packer.lengths),
        "visual_units": visual_units,
        "elapsed_s": elapsed,
        "records_per_s": pipeline.consumed / elapsed,
        "tokens_per_s": stats.real_tokens / elapsed,
        "rows_per_s": stats.rows / elapsed,
        "dropped_overlong": stats.dropped_overlong,
        "truncated_overlong": stats.truncated_overlong,
        "utilisation": utilisation,
        "utilisation_vs_pad_to_longest": {
            name: (value / utilisation["pad_to_longest"] if utilisation["pad_to_longest"] else None)
            for name, value in utilisation.items() if name != "pad_to_longest"},
    }


def run(args) -> int:
    """Entry point of `mindspeed-vita bench data`."""
    from mindspeed_vita.data.tokenizer import load_tokenizer

    for flag, value, least in (("--samples", args.samples, 1), ("--num-workers", args.num_workers, 0),
                               ("--pack-lookahead", args.pack_lookahead, 1), ("--batch-size", args.batch_size, 1),
                               ("--seq-length", args.seq_length, 1)):
        if value < least:
            raise UserInputError(f"{flag} {value}: must be >= {least}")
    with tempfile.TemporaryDirectory(prefix="mindspeed-vita-bench-data-") as scratch:
        data_dir = args.data or _write_synthetic(os.path.join(scratch, "data"), quiet=args.json)
        mixture = os.path.join(data_dir, f"stage{args.stage}.yaml")
        if not os.path.isfile(mixture):
            raise UserInputError(f"{mixture}: no such mixture; write the synthetic dataset with "
                                 f"`mindspeed-vita data synth {data_dir}`")
        stage = _stage_config(mixture, args)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

            tokenizer = load_tokenizer(build_tiny_tokenizer(os.path.join(scratch, "tokenizer")))
        result = measure_pipeline(stage, tokenizer, samples=args.samples, batch_size=args.batch_size,
                                  show_progress=True)
    report = {
        "data": args.data or "written to a temporary directory",
        "stage": args.stage,
        "tokenizer": args.tokenizer or "tiny demo tokenizer",
        "image_size": stage.model.vision.image_size,
        "tokens_per_tile": stage.model.tokens_per_tile,
        "seq_length": stage.data.seq_length,
        "packing": stage.data.packing,
        "lookahead": stage.data.pack_lookahead,
        "batch_size": args.batch_size,
        "workers": stage.data.num_workers,
        **result,
    }
    if args.json:
        print_json(report)
    else:
        print(_format(report))
    return 0


def _write_synthetic(out_dir: str, *, quiet: bool) -> str:
    from mindspeed_vita.data.synth import write_synthetic_dataset

    if not quiet:
        print(f"[bench data] writing the synthetic dataset to {out_dir}", file=sys.stderr, flush=True)
    write_synthetic_dataset(out_dir, seed=0)
    return out_dir


def _format(report: Dict[str, Any]) -> str:
    utilisation, ratios = report["utilisation"], report["utilisation_vs_pad_to_longest"]

    def ratio(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        f"bench data: synthetic stage {report['stage']} mixture ({report['data']}), "
        f"{report['image_size']}-pixel tiles ({report['tokens_per_tile']} tokens each), rows of "
        f"{report['seq_length']}, {report['packing']} packing, {report['workers']} loader workers, "
        f"tokenizer: {report['tokenizer']}",
        f"{report['records']} records ({sum(report['rejected'].values())} rejected) -> {report['rows']} rows "
        f"in {report['elapsed_s']:.2f} s: {report['records_per_s']:.1f} samples/s, "
        f"{report['tokens_per_s']:,.0f} tokens/s (full render with pixels + pack), "
        f"{report['rows_per_s']:.2f} rows/s, {report['visual_units']} visual units",
        "",
        format_table(["batching", "utilisation", "vs pad-to-longest"], [
            [f"packer (lookahead {report['lookahead']})", f"{utilisation['packer']:.1%}", ratio(ratios["packer"])],
            ["next-fit packer (lookahead 1)", f"{utilisation['next_fit']:.1%}", ratio(ratios["next_fit"])],
            [f"pad-to-longest (batch {report['batch_size']})", f"{utilisation['pad_to_longest']:.1%}", "1.00x"],
        ]),
    ]
    return "\n".join(lines)
