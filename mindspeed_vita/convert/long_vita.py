"""The Long-VITA release's `_HF` checkpoints (`LongVITAForCausalLM`) <-> native state.

The layout of the authors' `Long-VITA-16K_HF` / `-128K_HF` / `-1M_HF` directories:

* config.json: `architectures: ["LongVITAForCausalLM"]`, `model_type: "long_vita"`, the
  language model's fields at top level as a Qwen2 config (`rope_theta`, `torch_dtype`, ...),
  the vision tower as a nested `"visual"` dict in the original InternViT format
  (`model_type: "intern_vit_6b"`). The downsample ratio (0.5) and the tile limits (1..12) are
  constants of the release, not config fields.
* weights: vision `model.vision_model.` + original InternViT names; projector
  `model.vision_projection.{pre_proj_layernorm.weight, pre_proj_layernorm.bias,
  mlp.0.weight, mlp.2.weight}` (the "long-vita" projector, no Linear biases); the language model
  as Qwen2 names under `model.*` plus `lm_head.weight`.
* tokenizer: Qwen2.5 files plus the 17 Long-VITA tokens from id 151665
  (`data.tokenizer.LONG_VITA_SPECIAL_TOKENS`); generation_config.json with
  `eos_token_id: [<|im_end|>, <|endoftext|>]` and `pad_token_id: <|endoftext|>`.

`import_long_vita` reads such a directory as a `NativeModel` (tokenizer from the directory;
shapes that disagree with config.json are refused naming the tensor and the config keys);
`export_long_vita` writes one, so import followed by export reproduces every tensor bit for bit.
The release's own HF model code no longer imports on current transformers; nothing here needs
it.
"""
from __future__ import annotations

import os
from typing import List, Mapping, Optional

import torch

from mindspeed_vita.config.model import ModelConfig, ProjectorConfig
from mindspeed_vita.convert.checkpoint import NativeModel, StateDict
from mindspeed_vita.convert.hf_internvl import (
    CONFIG_FILE, INTERNVIT_CONFIG_KEYS, QWEN2_CONFIG_KEYS, check_native_shapes, fit_vocabulary,
    language_config_from_qwen2, load_import_tokenizer, params_dtype_of, qwen2_to_native_language,
    read_generation_config, read_hf_weights, read_json, split_native_state,
    write_generation_config_and_tokenizer, write_hf_weights, write_json)
from mindspeed_vita.convert.hf_split import vision_config_from_internvit
from mindspeed_vita.convert.qwen2_weights import native_to_hf_qwen2
from mindspeed_vita.convert.vision_weights import (
    WeightMappingError, hf_internvit_to_native, native_to_hf_internvit)
from mindspeed_vita.errors import CheckpointError

MODEL_TYPE = "long_vita"
ARCHITECTURE = "LongVITAForCausalLM"
VISUAL_KEY = "visual"
VISION_PREFIX = "model.vision_model."
PROJECTOR_PREFIX = "model.vision_projection."
#: native projector name -> release name (under PROJECTOR_PREFIX); index 1 of `mlp` is the GELU
PROJECTOR_NAMES = {"norm.weight": "pre_proj_layernorm.weight",
                   "norm.bias": "pre_proj_layernorm.bias",
                   "fc1.weight": "mlp.0.weight", "fc2.weight": "mlp.2.weight"}
#: constants of the release (not in its config.json)
DOWNSAMPLE_RATIO = 0.5
MIN_TILES, MAX_TILES = 1, 12

#: native config key -> the key of a release config.json that sets it (messages)
LONG_VITA_CONFIG_KEYS = {**{k: f"{VISUAL_KEY}.{v}" for k, v in INTERNVIT_CONFIG_KEYS.items()},
                         **QWEN2_CONFIG_KEYS}


def is_long_vita_config(config: Mapping) -> bool:
    """True when a config.json dict is a Long-VITA release `_HF` config."""
    return (config.get("model_type") == MODEL_TYPE
            or ARCHITECTURE in (config.get("architectures") or ()))


def is_long_vita_dir(path: str) -> bool:
    """True when `path/config.json` declares a Long-VITA release checkpoint."""
    config = os.path.join(path, CONFIG_FILE)
    return os.path.isfile(config) and is_long_vita_config(read_json(config))


# ------------------------------------------------------------------- config
def model_config_from_long_vita(source: dict, where: str) -> ModelConfig:
    """`ModelConfig` of a release config.json dict (read from `where`)."""
    from transformers import Qwen2Config

    visual = source.get(VISUAL_KEY)
    if not isinstance(visual, dict):
        raise CheckpointError(f"{where}: missing key {VISUAL_KEY!r} (the vision tower's config)")
    vision = vision_config_from_internvit(visual, f"{where}: key {VISUAL_KEY!r}")
    text_fields = {k: v for k, v in source.items()
                   if k not in (VISUAL_KEY, "model_type", "architectures", "auto_map")}
    try:
        text = Qwen2Config.from_dict(text_fields)
    except Exception as exc:  # transformers raises several types for a bad config
        raise CheckpointError(f"{where}: not a valid Qwen2 language config: {exc}") from exc
    language = language_config_from_qwen2(
        text, tie_word_embeddings=bool(source.get("tie_word_embeddings", False)), where=where)
    dtype = source.get("torch_dtype", source.get("dtype"))
    try:
        return ModelConfig(vision=vision,
                           projector=ProjectorConfig(variant="long-vita",
                                                     downsample_ratio=DOWNSAMPLE_RATIO),
                           language=language, image_layout="long-vita", min_tiles=MIN_TILES,
                           max_tiles=MAX_TILES,
                           params_dtype=params_dtype_of(dtype, {}, where) if dtype else "float32")
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def long_vita_config_json(cfg: ModelConfig, source: Optional[dict] = None) -> dict:
    """A release config.json dict describing `cfg`; fields of `source` (the config.json the
    model came from: a release config, or `{"text_config": qwen2 config}` of a Qwen2 +
    InternViT import) that mindspeed-vita does not model are kept."""
    if cfg.projector.variant != "long-vita" or cfg.image_layout != "long-vita":
        raise CheckpointError(
            f"the long-vita layout holds a 'long-vita' projector and image layout; this model "
            f"has projector.variant={cfg.projector.variant!r}, "
            f"image_layout={cfg.image_layout!r} (export it with --layout internvl)")
    if cfg.projector.downsample_ratio != DOWNSAMPLE_RATIO:
        raise CheckpointError(f"projector.downsample_ratio={cfg.projector.downsample_ratio} "
                              f"cannot be expressed: the release fixes it at {DOWNSAMPLE_RATIO}")
    source = dict(source or {})
    base = dict(source.get("text_config") or {}) if "text_config" in source else source
    visual = dict(base.get(VISUAL_KEY) or {})
    v, lang = cfg.vision, cfg.language
    visual.update({
        "architectures": visual.get("architectures", ["InternVisionModel"]),
        "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size, "image_size": v.image_size,
        "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "qkv_bias": v.qkv_bias,
        "qk_normalization": False, "norm_type": "layer_norm", "hidden_act": "gelu",
        "num_channels": 3})
    visual.setdefault("initializer_factor", v.layer_scale_init)
    config = {k: val for k, val in base.items()
              if k not in ("rope_parameters", "rope_scaling", "dtype", "text_config")}
    config.update({
        VISUAL_KEY: visual, "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "hidden_act": "silu", "hidden_size": lang.hidden_size,
        "intermediate_size": lang.ffn_hidden_size, "num_hidden_layers": lang.num_layers,
        "num_attention_heads": lang.num_attention_heads,
        "num_key_value_heads": lang.num_query_groups, "vocab_size": lang.vocab_size,
        "rms_norm_eps": lang.rms_norm_eps, "rope_theta": lang.rotary_base,
        "max_position_embeddings": lang.max_position_embeddings,
        "tie_word_embeddings": lang.tie_word_embeddings, "torch_dtype": cfg.params_dtype,
        "use_sliding_window": False})
    return config


# ------------------------------------------------------------------ weights
def long_vita_to_native(state: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str,
                        config_file: Optional[str] = None) -> StateDict:
    """Release `_HF` tensors -> the full (tp=1) `LongVitaModel` state, every tensor checked
    against `cfg` (CheckpointError naming the tensor and, with `config_file`, its keys)."""
    vision: StateDict = {}
    projector: StateDict = {}
    qwen2: StateDict = {}
    release_to_native = {v: k for k, v in PROJECTOR_NAMES.items()}
    for key, tensor in state.items():
        if key.startswith(VISION_PREFIX):
            vision[key] = tensor
        elif key.startswith(PROJECTOR_PREFIX):
            name = key[len(PROJECTOR_PREFIX):]
            if name not in release_to_native:
                raise CheckpointError(f"{where}: tensor {key!r} is not part of the Long-VITA "
                                      f"projector (expected {PROJECTOR_PREFIX}"
                                      f"{{{', '.join(sorted(release_to_native))}}})")
            projector["projector." + release_to_native[name]] = tensor
        elif key.startswith("model.") or key.startswith("lm_head."):
            qwen2[key] = tensor
        else:
            raise CheckpointError(f"{where}: tensor {key!r} is not part of a Long-VITA model")
    if not vision:
        raise CheckpointError(f"{where}: no vision weights under {VISION_PREFIX!r}; is it a "
                              f"Long-VITA checkpoint?")
    try:
        native = {"vision." + k: v
                  for k, v in hf_internvit_to_native(vision, VISION_PREFIX).items()}
    except WeightMappingError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    native.update(projector)
    names = LONG_VITA_CONFIG_KEYS if config_file else None
    check_native_shapes(native, cfg, where, parts=("vision", "projector"),
                        config_file=config_file, key_names=names)
    native.update(qwen2_to_native_language(qwen2, cfg.language, where, config_file=config_file,
                                           key_names=names))
    return native


def native_to_long_vita(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """The full (tp=1) `LongVitaModel` state -> release `_HF` tensor names."""
    parts = split_native_state(state)
    out: StateDict = {}
    try:
        out.update(native_to_hf_internvit(parts["vision"], prefix=VISION_PREFIX))
        qwen2 = native_to_hf_qwen2([parts["language"]], cfg.language)
    except (WeightMappingError, KeyError, ValueError) as exc:
        raise CheckpointError(f"native state: {exc.args[0] if exc.args else exc}") from exc
    for name, tensor in parts["projector"].items():
        if name not in PROJECTOR_NAMES:
            raise CheckpointError(f"native tensor 'projector.{name}' has no place in the "
                                  f"Long-VITA projector")
        out[PROJECTOR_PREFIX + PROJECTOR_NAMES[name]] = tensor
    out.update(qwen2)
    return out


# -------------------------------------------------------------- directories
def import_long_vita(path: str) -> NativeModel:
    """Read a release `_HF` directory (config.json, weights, tokenizer) as a `NativeModel`.

    The tokenizer is the directory's own; Long-VITA tokens it lacks are added (with embedding
    rows that are the mean of the existing ones, `hf_internvl.fit_vocabulary`)."""
    where = os.path.join(path, CONFIG_FILE)
    source = read_json(where)
    if not is_long_vita_config(source):
        raise CheckpointError(f"{where}: model_type is {source.get('model_type')!r}, expected "
                              f"{MODEL_TYPE!r} (a Long-VITA release directory)")
    cfg = model_config_from_long_vita(source, where)
    state = read_hf_weights(path)
    if not (source.get("torch_dtype") or source.get("dtype")):
        cfg = cfg.model_copy(update={"params_dtype": params_dtype_of(None, state, where)})
    tokenizer, added, source_size = load_import_tokenizer(path)
    where_weights = f"weights of {path}"
    language_keys = [k for k in state if not k.startswith((VISION_PREFIX, PROJECTOR_PREFIX))]
    qwen2, language = fit_vocabulary({k: state[k] for k in language_keys}, cfg.language, added,
                                     source_size, len(tokenizer))
    cfg = cfg.model_copy(update={"language": language})
    merged = {k: v for k, v in state.items() if k not in qwen2}
    merged.update(qwen2)
    native = long_vita_to_native(merged, cfg, where_weights, config_file=where)
    return NativeModel(cfg=cfg, state=native, tokenizer=tokenizer, hf_source_config=source,
                       hf_generation_config=read_generation_config(path))


def long_vita_generation_config(native: NativeModel) -> dict:
    """generation_config.json as the release writes it: eos `[<|im_end|>, <|endoftext|>]`
    (plus the tokenizer's eos if it is neither), pad and bos `<|endoftext|>`; sampling settings
    of the source's generation config are kept."""
    tok = native.tokenizer
    config = {k: v for k, v in (native.hf_generation_config or {}).items()
              if k not in ("transformers_version", "_from_model_config")}
    endoftext = tok.endoftext_id if tok.endoftext_id is not None else tok.pad_id
    eos: List[int] = [int(tok.im_end_id), int(endoftext)]
    if int(tok.eos_id) not in eos:
        eos.append(int(tok.eos_id))
    config["eos_token_id"] = eos
    config["pad_token_id"] = int(endoftext)
    config.setdefault("bos_token_id", int(endoftext))
    return config


def export_long_vita(native: NativeModel, path: str, where: str = "native state") -> List[str]:
    """Write `native` as a release `_HF` directory (config.json, generation_config.json,
    weights, tokenizer files). Returns the weight files. A state whose tensors disagree with
    its config is refused first (CheckpointError naming `where` and the tensor)."""
    check_native_shapes(native.state, native.cfg, where)
    config = long_vita_config_json(native.cfg, native.hf_source_config)
    os.makedirs(path, exist_ok=True)
    files = write_hf_weights(native_to_long_vita(native.state, native.cfg), path)
    write_json(os.path.join(path, CONFIG_FILE), config)
    write_generation_config_and_tokenizer(native, path, long_vita_generation_config(native))
    return files
