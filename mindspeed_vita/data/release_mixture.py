"""The Long-VITA release's mixture YAML, read as our mixture and converted to it.

The release's stage YAMLs (`configs/long_vita_finetune_stage*.yaml`) describe data as::

    dataset:
      LLaVA-ReCap:
        ratio: 1.0            # per file: use int(len * ratio) records, wrapping around if > 1
        num: 300000           # optional per-file cap
        data_paths:           # JSONL or JSON-array files, relative to the working directory
          - datasets/jsonl/lmms-lab/LLaVA-ReCap-558K/data.jsonl
          - datasets/jsonl/lmms-lab/LLaVA-ReCap-118K/data.jsonl

`release_to_sources` maps it to our `sources:` list: one source per data path (named NAME when
the entry has one path, NAME[i] otherwise), with the entry's ratio and num (the release
applies both per file), data paths made absolute against the working directory and media
paths read as written (`paths: as_written`), as the release reads them. An entry with ratio 0
or num 0 is dropped without looking at its files, as in the release. Other top-level keys of
the release's YAML (training options such as `xlsx_sample_num`) are not about the mixture and
are ignored. Unlike the release, a missing data file is an error, not a warning.

`mindspeed-vita data convert-mixture IN OUT` writes the converted mixture as a YAML file.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from mindspeed_vita.errors import UserInputError

_ENTRY_KEYS = ("ratio", "num", "data_paths")


def is_release_mixture(raw: Any) -> bool:
    """True for a parsed YAML in the release's format (`dataset:` and no `sources:`)."""
    return isinstance(raw, dict) and "dataset" in raw and "sources" not in raw


def release_to_sources(raw: Dict[str, Any], *, origin: str) -> Dict[str, List[dict]]:
    """The release's `{"dataset": {...}}` -> our `{"sources": [...]}` (see module doc).
    UserInputError naming `origin` and the key (e.g. "dataset.LLaVA.ratio") on bad input."""
    def fail(key: str, message: str) -> UserInputError:
        return UserInputError(f"{origin}: {key}: {message}")

    dataset = raw.get("dataset")
    if not isinstance(dataset, dict) or not dataset:
        raise fail("dataset", "must be a non-empty mapping NAME -> {ratio, num, data_paths}")
    sources: List[dict] = []
    for name, entry in dataset.items():
        key = f"dataset.{name}"
        if not isinstance(entry, dict):
            raise fail(key, f"must be a mapping with keys {list(_ENTRY_KEYS)}")
        unknown = sorted(set(entry) - set(_ENTRY_KEYS))
        if unknown:
            raise fail(f"{key}.{unknown[0]}", f"unknown key (expected {list(_ENTRY_KEYS)})")
        ratio = entry.get("ratio", 1)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 0:
            raise fail(f"{key}.ratio", f"must be a number >= 0, got {ratio!r}")
        num = entry.get("num")
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 0):
            raise fail(f"{key}.num", f"must be an integer >= 0, got {num!r}")
        if ratio == 0 or num == 0:
            continue  # dropped, as the release drops it: its files are never opened
        paths = entry.get("data_paths")
        if not isinstance(paths, list) or not paths:
            raise fail(f"{key}.data_paths", "must be a non-empty list of file paths")
        for index, path in enumerate(paths):
            if not isinstance(path, str) or not path.strip():
                raise fail(f"{key}.data_paths[{index}]", f"must be a file path, got {path!r}")
            source = {"name": str(name) if len(paths) == 1 else f"{name}[{index}]",
                      "path": os.path.abspath(path.strip()), "paths": "as_written",
                      "ratio": float(ratio)}
            if num is not None:
                source["num"] = num
            sources.append(source)
    if not sources:
        raise fail("dataset", "every entry has ratio 0 or num 0: the mixture selects no data")
    return {"sources": sources}


def add_arguments(parser) -> None:
    """Arguments of `mindspeed-vita data convert-mixture`."""
    parser.add_argument("src", metavar="IN", help="the release's mixture / stage YAML")
    parser.add_argument("dst", metavar="OUT", help="mixture YAML to write (our sources: format)")


def run(args) -> int:
    """Convert; prints the sources written. Returns 0."""
    import yaml

    from mindspeed_vita.data.mixture import MixtureConfig

    if os.path.exists(args.dst):
        raise UserInputError(f"{args.dst}: already exists; choose a new path")
    try:
        with open(args.src, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except OSError as error:
        raise UserInputError(f"{args.src}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise UserInputError(f"{args.src}: not valid YAML ({error})") from None
    if not is_release_mixture(raw):
        raise UserInputError(f"{args.src}: not a release mixture (no top-level 'dataset' key)")
    converted = release_to_sources(raw, origin=args.src)
    # validated as we will read it (names unique, files present) before anything is written
    MixtureConfig.from_dict(converted, base_dir=os.getcwd(), origin=args.src)
    for index, source in enumerate(converted["sources"]):
        if not os.path.isfile(source["path"]):
            raise UserInputError(f"{args.src}: data path of {source['name']}: no such file "
                                 f"{source['path']}")
    header = (f"# converted from the Long-VITA release mixture {os.path.abspath(args.src)}\n"
              f"# by `mindspeed-vita data convert-mixture`; media paths are read as written\n"
              f"# (absolute, or relative to the working directory the run starts in)\n")
    with open(args.dst, "w", encoding="utf-8") as handle:
        handle.write(header)
        yaml.safe_dump(converted, handle, sort_keys=False)
    for source in converted["sources"]:
        cap = f", num {source['num']}" if "num" in source else ""
        print(f"{source['name']}: {source['path']} (ratio {source['ratio']}{cap})")
    print(f"wrote {args.dst}: {len(converted['sources'])} sources")
    return 0
