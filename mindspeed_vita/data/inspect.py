"""`mindspeed-vita data inspect`: what a data mixture holds, before anything trains on it.

The input is a stage YAML (its data.mixture, model, seq_length, packing, limits and parallel
layout are used), a mixture YAML, or one JSONL file (a single source whose media root is the
file's directory). Every record one epoch selects is read once, in stream order (the order
training sees, for the mixture's seed), validated and rendered in dry mode: image sizes come
from the file headers and frame counts from the video index, no pixel is decoded (`--decode`
decodes everything, which also catches damage past the headers). The rendered samples then go
through the stage's packer.

Reported per source and in total: records read, accepted samples, tokens, label tokens,
images, tiles, videos, frames, and rejections by `DataError.reason` with the first file:line
examples; plus the packer's utilisation. Bad data never stops the run, every bad record is
counted, unless `--strict`, which fails on the first one with its file:line. A sample longer
than seq_length is rejected as "too_long" when the stage drops overlong samples (the packer
drops it in training); with `on_overlong: truncate` it is accepted and counted as truncated.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, TextIO

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from mindspeed_vita.config.loader import build_config, load_config
from mindspeed_vita.config.schema import StageConfig
from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.loader import parse_record
from mindspeed_vita.data.release_mixture import is_release_mixture
from mindspeed_vita.data.mixture import MixtureConfig, MixtureStream
from mindspeed_vita.data.packing import packer_for
from mindspeed_vita.data.render import render_sample
from mindspeed_vita.data.template import image_units
from mindspeed_vita.data.tokenizer import VitaTokenizer
from mindspeed_vita.data.types import IGNORE_INDEX, RenderedSample
from mindspeed_vita.errors import UserInputError
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.progress import progress

#: file:line examples kept per rejection reason
EXAMPLES_PER_REASON = 3
_YAML_SUFFIXES = (".yaml", ".yml")

# ------------------------------------------------------------------------------ input


@dataclass
class InspectTarget:
    """What to inspect: the validated stage settings and the mixture they point at."""

    kind: str  # "stage" | "mixture" | "jsonl"
    stage: StageConfig
    mixture: MixtureConfig


def resolve_target(path: str, *, model_config: Optional[str] = None,
                   data_overrides: Optional[Dict[str, Any]] = None) -> InspectTarget:
    """Read `path` (stage YAML, mixture YAML or JSONL) into a validated `InspectTarget`.

    `model_config` (a model-section YAML) replaces the stage's model (default for a mixture or
    JSONL: the Long-VITA-14B geometry); `data_overrides` replace data.* keys before validation,
    so a bad value is reported under its config key. Raises `UserInputError` / `ConfigError`.
    """
    overrides = {k: v for k, v in (data_overrides or {}).items() if v is not None}
    if not os.path.exists(path):
        raise UserInputError(f"{path}: no such file")
    if path.endswith(_YAML_SUFFIXES):
        raw = _read_yaml(path)
        if isinstance(raw, dict) and ("sources" in raw or is_release_mixture(raw)):
            kind, mixture = "mixture", _load_mixture(path)
            stage_raw = {"name": "inspect", "data": {"mixture": os.path.abspath(path)}}
        else:
            kind, stage_raw = "stage", load_config(path).model_dump(mode="json")
            mixture = None
    else:
        kind, stage_raw = "jsonl", {"name": "inspect"}
        mixture = _single_source(path)
    stage_raw.setdefault("data", {}).update(overrides)
    if model_config is not None:
        model_raw = _read_yaml(model_config)
        if not isinstance(model_raw, dict):
            raise UserInputError(f"{model_config}: a model config must be a mapping of model keys")
        stage_raw["model"] = model_raw
    stage = build_config(stage_raw, source=path)
    if kind == "stage":
        if not stage.data.mixture:
            raise UserInputError(f"{path}: config key 'data.mixture' is not set: the stage has no data")
        mixture = _load_mixture(stage.data.mixture)
    return InspectTarget(kind=kind, stage=stage, mixture=mixture)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as error:
        raise UserInputError(f"{path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise UserInputError(f"{path}: not valid YAML ({error})") from None


def _load_mixture(path: str) -> MixtureConfig:
    return MixtureConfig.from_yaml(path)  # errors are UserInputErrors naming file and key


def _single_source(path: str) -> MixtureConfig:
    """A one-source mixture over a JSONL file; media paths are relative to its directory."""
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: not a file (expected a JSONL file or a YAML config)")
    path = os.path.abspath(path)
    name = os.path.splitext(os.path.basename(path))[0] or "jsonl"
    raw = {"sources": [{"name": name, "path": path, "ratio": 1.0}]}
    return MixtureConfig.from_dict(raw, base_dir=os.path.dirname(path), origin=path)


# ----------------------------------------------------------------------------- counts


@dataclass
class SourceCounts:
    """Counters of one source (or the total). Sample counters cover accepted samples only."""

    records: int = 0  # records read (accepted + rejected)
    samples: int = 0  # accepted samples
    tokens: int = 0  # rendered tokens of the accepted samples
    label_tokens: int = 0  # tokens with a loss (assistant text)
    max_tokens: int = 0  # longest accepted sample
    images: int = 0
    tiles: int = 0  # image tiles (cols * rows per image; thumbnails not counted)
    videos: int = 0
    frames: int = 0  # sampled video frames
    visual_units: int = 0  # what the ViT encodes: tiles + thumbnails + frames
    rejected: Dict[str, int] = field(default_factory=dict)

    def accept(self, sample: RenderedSample, units: int) -> None:
        """Count one accepted sample with `units` visual units."""
        self.samples += 1
        self.tokens += sample.num_tokens
        self.label_tokens += int((sample.labels != IGNORE_INDEX).sum())
        self.max_tokens = max(self.max_tokens, sample.num_tokens)
        self.images += len(sample.image_grids)
        self.tiles += sum(cols * rows for cols, rows in sample.image_grids)
        self.videos += len(sample.num_frames)
        self.frames += sum(sample.num_frames)
        self.visual_units += units

    def reject(self, reason: str) -> None:
        """Count one rejected record under `reason`."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def merge(self, other: "SourceCounts") -> None:
        """Add `other`'s counters into this one (for the total)."""
        for name, value in asdict(other).items():
            if name == "rejected":
                for reason, count in value.items():
                    self.rejected[reason] = self.rejected.get(reason, 0) + count
            elif name == "max_tokens":
                self.max_tokens = max(self.max_tokens, value)
            else:
                setattr(self, name, getattr(self, name) + value)


@dataclass
class _Outcome:
    source_idx: int
    sample: Optional[RenderedSample]
    units: int
    error: Optional[DataError]


class _RecordInspector(Dataset):
    """Stream position -> rendered (dry) sample or its rejection; runs in loader workers."""

    def __init__(self, stream: MixtureStream, render: Callable, size: int):
        self.stream = stream
        self.render = render
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, position: int) -> _Outcome:
        item = self.stream.item(position)
        raw = None
        try:
            raw = self.stream.read(item.source_idx, item.line_idx)
            sample = self.render(parse_record(raw))
        except DataError as error:
            if raw is not None and (error.path != raw.path or error.line != raw.line):
                error = error.at(raw.path, raw.line)
            return _Outcome(item.source_idx, None, 0, error)
        except Exception as error:  # a bug, not bad data: say which record triggered it
            where = f"{raw.path}:{raw.line}" if raw is not None else f"stream position {position}"
            error.add_note(f"while inspecting {where}")
            raise
        units = sum(image_units(grid) for grid in sample.image_grids) + sum(sample.num_frames)
        # NOTE: the packer only needs one pixel entry per visual unit (to cut an overlong sample
        # at a unit boundary exactly as in training); 1x1 placeholders keep rows small.
        slim = RenderedSample(source=sample.source, line=sample.line, input_ids=sample.input_ids,
                              labels=sample.labels, pixel_values=torch.zeros(units, 3, 1, 1),
                              image_grids=sample.image_grids, num_frames=sample.num_frames)
        return _Outcome(item.source_idx, slim, units, None)


def _first(outcome: _Outcome) -> _Outcome:
    return outcome


def inspect_mixture(target: InspectTarget, tokenizer: VitaTokenizer, *, limit: Optional[int] = None,
                    strict: bool = False, decode: bool = False, workers: int = 0,
                    show_progress: bool = False, keep_samples: bool = True,
                    progress_stream: Optional[TextIO] = None) -> Dict[str, Any]:
    """Read, validate, render (dry unless `decode`) and pack one epoch of `target`'s mixture.

    Returns the report as a JSON-ready dict: "sources" and "total" (`SourceCounts` fields),
    "rejected" (count per reason), "rejected_examples" (first file:line messages per reason),
    "packing" (the packer's counters and utilisation), "samples" (per accepted sample: source,
    line, tokens, the (cols, rows) tile grid of each image and the frames of each video; only
    with `keep_samples`), plus the settings used. With `strict`, the first rejection is raised
    as a `DataError` ("file:line: detail"). `show_progress`: a progress bar (or periodic lines
    with rate and time left, off a terminal) on `progress_stream` (default stderr).
    """
    if workers < 0:
        raise UserInputError(f"--num-workers {workers}: must be >= 0")
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit {limit}: must be >= 1")
    stage, data, model = target.stage, target.stage.data, target.stage.model
    try:
        stream = MixtureStream(target.mixture, seed=data.seed)
    except ValueError as error:  # e.g. every source has ratio 0, or a selected file is empty
        raise UserInputError(f"mixture: {error}") from None
    total_records = stream.items_per_epoch if limit is None else min(limit, stream.items_per_epoch)

    render = functools.partial(render_sample, tokenizer=tokenizer, model_cfg=model,
                               max_num_frame=data.max_num_frame, max_images=data.max_images,
                               max_frames=data.max_frames, max_tiles=data.max_tiles,
                               grids_only=not decode)
    layout = ParallelLayout.from_config(stage.parallel, world_size=None)
    packer = packer_for(layout, data, pad_id=tokenizer.pad_id,
                        context_token_ids=tokenizer.context_token_ids,
                        tokens_per_unit=model.tokens_per_tile)

    names = [spec.name for spec in target.mixture.sources]
    counts = [SourceCounts() for _ in names]
    examples: Dict[str, List[str]] = {}
    samples: List[Dict[str, Any]] = []

    def reject(source_idx: int, error: DataError) -> None:
        if strict:
            raise error
        counts[source_idx].reject(error.reason)
        kept = examples.setdefault(error.reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(str(error))

    start = time.perf_counter()
    bar = progress(total=total_records, desc="[inspect] records", unit="records",
                   enabled=show_progress, stream=progress_stream)
    for position, outcome in zip(range(total_records), _outcomes(stream, render, total_records, workers)):
        source_idx = outcome.source_idx
        counts[source_idx].records += 1
        sample = outcome.sample
        if outcome.error is not None:
            reject(source_idx, outcome.error)
        elif sample.num_tokens > data.seq_length and data.on_overlong == "drop":
            # the packer drops it (counted there too): training never sees this sample
            packer.add(position, sample)
            reject(source_idx, DataError(
                "too_long", f"{sample.num_tokens} tokens, more than data.seq_length = {data.seq_length}",
                path=target.mixture.sources[source_idx].path, line=sample.line))
        else:
            counts[source_idx].accept(sample, outcome.units)
            packer.add(position, sample)
            if keep_samples:
                samples.append({"source": sample.source, "line": sample.line, "tokens": sample.num_tokens,
                                "tiles": [list(grid) for grid in sample.image_grids],
                                "frames": list(sample.num_frames)})
        while packer.pop() is not None:  # only the counters matter here
            pass
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start

    streamed = packer.stats.as_dict()
    packer.flush()
    while packer.pop() is not None:
        pass
    total = SourceCounts()
    for source_counts in counts:
        total.merge(source_counts)
    sources = {}
    for spec, described, source_counts in zip(target.mixture.sources, stream.describe(), counts):
        sources[spec.name] = {**asdict(source_counts), "path": spec.path, "ratio": spec.ratio,
                              "num": spec.num, "records_in_file": described["records"],
                              "records_per_epoch": described["items"]}
    report = {
        "kind": target.kind,
        "mode": "decode" if decode else "grids_only",
        "model": {"image_size": model.vision.image_size, "tokens_per_tile": model.tokens_per_tile,
                  "min_tiles": model.min_tiles, "max_tiles": data.max_tiles or model.max_tiles,
                  "image_layout": model.image_layout},
        "data": {key: getattr(data, key) for key in ("mixture", "seed", "seq_length", "packing", "on_overlong",
                                                    "pack_lookahead", "max_images", "max_frames",
                                                    "max_num_frame", "max_tiles")},
        "records_per_epoch": stream.items_per_epoch,
        "records": total.records,
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(total.records / elapsed, 1) if elapsed > 0 else None,
        "sources": sources,
        "total": asdict(total),
        "rejected": dict(sorted(total.rejected.items())),
        "rejected_examples": dict(sorted(examples.items())),
        "packing": {**packer.stats.as_dict(), "mode": packer.mode, "seq_length": packer.seq_length,
                    "lookahead": packer.lookahead, "pad_multiple": packer.pad_multiple,
                    "segment_multiple": packer.segment_multiple,
                    # rows closed while streaming, without the end-of-epoch flush: an endless
                    # training stream carries the leftovers into the next epoch's rows instead
                    "streaming_rows": streamed["rows"],
                    "streaming_utilisation": streamed["utilisation"] if streamed["rows"] else None},
    }
    if keep_samples:
        report["samples"] = samples
    return report


def _outcomes(stream: MixtureStream, render: Callable, size: int, workers: int) -> Iterable[_Outcome]:
    """Outcomes of stream positions 0..size-1, in order, from this process or `workers`."""
    dataset = _RecordInspector(stream, render, size)
    if workers == 0:
        return (dataset[position] for position in range(size))
    return DataLoader(dataset, batch_size=None, sampler=range(size), num_workers=workers,
                      collate_fn=_first, prefetch_factor=4)


# ---------------------------------------------------------------------------- output


def format_report(report: Dict[str, Any]) -> str:
    """The human-readable report: settings, a per-source table, rejections, packing."""
    from mindspeed_vita.bench.common import format_table

    data, model, packing = report["data"], report["model"], report["packing"]
    lines = [
        f"input: {report['input']} ({report['kind']}); {report['records']} of "
        f"{report['records_per_epoch']} records of one epoch (seed {data['seed']}), "
        f"{report['elapsed_s']:.1f} s",
        f"tokenizer: {report['tokenizer']['description']}",
        f"model: {model['image_size']}-pixel tiles, {model['tokens_per_tile']} tokens per tile/frame, "
        f"{model['min_tiles']}..{model['max_tiles']} tiles per image ({model['image_layout']} layout); "
        f"{'full decode' if report['mode'] == 'decode' else 'headers only (no pixel decoding)'}",
        f"limits: max_images {data['max_images']}, max_frames {data['max_frames']}, "
        f"max_num_frame {data['max_num_frame']}, seq_length {data['seq_length']} ({data['on_overlong']} "
        f"overlong)",
        "",
    ]
    headers = ["source", "records", "samples", "rejected", "tokens", "tok/sample", "max tok", "label tok",
               "images", "tiles", "videos", "frames"]
    rows = []
    for name, counts in list(report["sources"].items()) + [("total", report["total"])]:
        rows.append([name, counts["records"], counts["samples"], sum(counts["rejected"].values()),
                     counts["tokens"], round(counts["tokens"] / counts["samples"]) if counts["samples"] else 0,
                     counts["max_tokens"], counts["label_tokens"], counts["images"], counts["tiles"],
                     counts["videos"], counts["frames"]])
    lines.append(format_table(headers, rows))
    lines.append("")
    if report["rejected"]:
        lines.append("rejected:")
        for reason, count in report["rejected"].items():
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    e.g. {example}" for example in report["rejected_examples"].get(reason, []))
    else:
        lines.append("rejected: none")
    lines.append("")
    streaming = packing["streaming_utilisation"]
    if streaming is None:
        # nothing filled a row before the end of the epoch: every row came from the final flush
        streaming_text = ("without the end-of-epoch flush: no row filled up before the end of "
                          "the epoch (every row above comes from the final flush)")
    else:
        streaming_text = (f"without the end-of-epoch flush (as in training): "
                          f"{packing['streaming_rows']} rows, utilisation {streaming:.1%}")
    lines.append(
        f"packing ({packing['mode']}, rows of {packing['seq_length']}, lookahead {packing['lookahead']}): "
        f"{packing['rows']} rows, {packing['samples']} samples, utilisation {packing['utilisation']:.1%} "
        f"({packing['real_tokens']} real tokens / {packing['slots']} slots); {streaming_text}; "
        f"dropped overlong {packing['dropped_overlong']}, truncated {packing['truncated_overlong']}")
    return "\n".join(lines)
