"""Load a StageConfig from YAML plus `key=value` overrides, with errors that name the key.

* A section may be given inline, as a path to another YAML file holding just that section
  (`model: ../model/tiny.yaml`), or as a mapping with `from: <path>` plus keys that override
  the included ones (`model: {from: ../model/long_vita_14b.yaml, lm_head: logits-masked}`);
  relative paths resolve against the file that names them.
* Overrides use dotted keys and YAML values: `parallel.tp=2`, `training.trainable=[projector]`.
* Relative input paths (`data.mixture`, `model.tokenizer`) are made absolute against the YAML
  file that names them; `key=value` overrides and output paths (`training.save`, ...) stay
  relative to the working directory, as on a launcher's command line.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Optional

import yaml
from pydantic import ValidationError

from mindspeed_vita.config.schema import ConfigError, StageConfig

#: sections that may be written as the path of a YAML file
_INCLUDABLE = ("model", "data", "parallel", "training", "inference", "backend_options")

#: file paths that resolve against the YAML file that names them (not the working directory)
_PATH_KEYS = {"data": ("mixture",), "model": ("tokenizer",)}


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def _resolve_includes(raw: Dict[str, Any], base_dir: str) -> Dict[str, Any]:
    out = dict(raw)
    for key in _INCLUDABLE:
        value = out.get(key)
        extra: Dict[str, Any] = {}
        if isinstance(value, dict) and isinstance(value.get("from"), str):
            extra = {k: v for k, v in value.items() if k != "from"}
            value = value["from"]
        if isinstance(value, str):
            path = value if os.path.isabs(value) else os.path.join(base_dir, value)
            # paths inside the included file are relative to it; override paths to this file
            included = _absolute_paths(key, _read_yaml(path), os.path.dirname(path))
            out[key] = _deep_merge(included, _absolute_paths(key, extra, base_dir))
        elif isinstance(value, dict):
            out[key] = _absolute_paths(key, value, base_dir)
    return out


def _absolute_paths(section: str, values: Dict[str, Any], base_dir: str) -> Dict[str, Any]:
    """`values` with the relative file paths of `section` (see `_PATH_KEYS`) made absolute."""
    out = dict(values)
    for name in _PATH_KEYS.get(section, ()):
        if isinstance(out.get(name), str):
            out[name] = _absolute(out[name], base_dir)
    return out


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for k, v in top.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _absolute(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def parse_override(text: str) -> tuple:
    """`a.b.c=value` -> (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. parallel.tp=2)")
    key, value = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty config key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Set each dotted key in the nested dict (creating sections as needed)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: config key {'.'.join(parts[:i + 1])!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


#: longest value (as repr) an error message shows before cutting it
_SHOWN_VALUE_CHARS = 60


def _shown(value: Any) -> str:
    """`repr(value)`, cut to `_SHOWN_VALUE_CHARS` (an unknown section can be kilobytes)."""
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[:_SHOWN_VALUE_CHARS - 3] + "..."


def _known_keys(model: Optional[type], loc: tuple) -> list:
    """The field names of the section of `model` at `loc` (a pydantic error location)."""
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        model = fields[part].annotation
    return list(getattr(model, "model_fields", {}))


def _unknown_key_message(key: str, loc: tuple, value: Any, model: Optional[type]) -> str:
    """`unknown config key 'a.b' (value ...)` plus a "did you mean" from the section's keys."""
    import difflib

    text = f"unknown config key {key!r} (value {_shown(value)})"
    parent = ".".join(str(p) for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(model, loc[:-1]), n=1, cutoff=0.6)
    if close:
        text += f"; did you mean {'.'.join(filter(None, (parent, close[0])))!r}?"
    elif loc == ("sources",):
        text += "; a data mixture file? Name it in data.mixture (or pass it to `data inspect`)"
    return text


def format_validation_error(err: ValidationError, source: str, model: Optional[type] = None) -> str:
    """One line per problem: `<source>: config key 'a.b' = <value>: <reason>`.

    `model` (default: StageConfig) is the validated class; it names the keys that an unknown
    key is compared with for a "did you mean" suggestion. Values are shown cut short."""
    model = model or StageConfig
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            unknown = _unknown_key_message(key, tuple(e["loc"]), e["input"], model)
            lines.append(f"{source}: {unknown}")
        elif e["type"] == "value_error" and "config key" in msg:
            lines.append(f"{source}: {msg}")
        else:
            where = f"config key {key!r}" if key else "config"
            value = e.get("input")
            shown = f" = {_shown(value)}" if not isinstance(value, dict) else ""
            lines.append(f"{source}: {where}{shown}: {msg}")
    return "\n".join(lines)


def build_config(raw: Dict[str, Any], source: str = "<config>") -> StageConfig:
    """Validate a raw mapping into a StageConfig (ConfigError on any problem)."""
    try:
        return StageConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: Optional[str], overrides: Iterable[str] = ()) -> StageConfig:
    """Read `path` (or start from defaults when None), apply overrides, validate completely."""
    raw: Dict[str, Any] = {}
    source = "<overrides>"
    if path:
        raw = _resolve_includes(_read_yaml(path), os.path.dirname(os.path.abspath(path)))
        source = path
    raw = apply_overrides(raw, overrides)
    return build_config(raw, source)
