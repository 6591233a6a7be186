"""transformers' InternVL (`InternVLForConditionalGeneration`) directories <-> native state.

Import: config.json + weights + tokenizer of an HF InternVL directory -> `NativeModel` (the full
tp=1 `LongVitaModel` state, a `ModelConfig` with projector variant "internvl" and image layout
"internvl", the tokenizer with the Long-VITA tokens). Export: the reverse, written the way
transformers' `save_pretrained` writes it, so import followed by export reproduces every tensor
bit for bit.

Weight names. transformers keeps two spellings of the same checkpoint and both are read:

=============================  ================================  ===========================
part                           on disk (hub, `save_pretrained`)  in memory (`state_dict()`)
=============================  ================================  ===========================
vision tower                   `vision_tower.`                   `model.vision_tower.`
projector                      `multi_modal_projector.`          `model.multi_modal_projector.`
Qwen2 decoder                  `language_model.model.`           `model.language_model.`
LM head                        `language_model.lm_head.`         `lm_head.`
=============================  ================================  ===========================

Export writes the on-disk spelling. The Long-VITA projector (bias-free, ViT-width bottleneck)
has no HF equivalent: it is written as `long_vita_projector.{layer_norm.weight, layer_norm.bias,
linear_1.weight, linear_2.weight}` and config.json says so under `"mindspeed_vita"`
(`projector_variant: "long-vita"`); transformers cannot run such a directory (it would
initialise `multi_modal_projector` at random), mindspeed-vita imports it back exactly.

Vocabulary: the tokenizer of the source directory gets the Long-VITA tokens it lacks
(`data.tokenizer.load_tokenizer`). The embedding and output rows of those new tokens are set to
the mean of the rows of the tokens the source tokenizer already had; when a new id is past the
checkpoint's vocabulary, the vocabulary grows to the tokenizer size first.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from mindspeed_vita.config.model import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from mindspeed_vita.convert.checkpoint import NativeModel, StateDict, dtype_name
from mindspeed_vita.convert.qwen2_weights import hf_to_native_qwen2, native_to_hf_qwen2
from mindspeed_vita.convert.vision_weights import (
    WeightMappingError, hf_to_native_projector, hf_to_native_vision, native_to_hf_projector,
    native_to_hf_vision)
from mindspeed_vita.errors import CheckpointError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
#: shards of an exported HF directory stay below this size (transformers' default is 5 GB too)
MAX_SHARD_BYTES = 5 * 1024 ** 3

#: key prefixes of the two spellings (see module doc)
HUB_PREFIXES = dict(vision="vision_tower.", projector="multi_modal_projector.",
                    language="language_model.model.", lm_head="language_model.lm_head.")
MODULE_PREFIXES = dict(vision="model.vision_tower.", projector="model.multi_modal_projector.",
                       language="model.language_model.", lm_head="lm_head.")
LONG_VITA_PROJECTOR_PREFIX = "long_vita_projector."
#: config.json block holding what HF InternVL cannot express
EXTRA_CONFIG_KEY = "mindspeed_vita"
#: native values an HF InternVL import takes when config.json has no EXTRA_CONFIG_KEY block
_EXTRA_DEFAULTS = {"projector_variant": "internvl", "image_layout": "internvl",
                   "projector_layer_norm_eps": 1e-5, "min_tiles": 1, "max_tiles": 12,
                   "make_vocab_size_divisible_by": 128, "encode_chunk_size": 256}


# -------------------------------------------------------------------- HF dir I/O
def read_json(path: str) -> dict:
    """A JSON file as a dict; CheckpointError naming the file and line on failure."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def write_json(path: str, content: dict) -> None:
    """`content` as a JSON file the way HF directories hold them: indented, sorted keys, a
    final newline."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")


def write_generation_config_and_tokenizer(native: NativeModel, path: str,
                                          generation_config: dict) -> None:
    """The last step of every HF export: generation_config.json and the tokenizer files.

    The generation config is written as plain JSON: GenerationConfig.save_pretrained refuses
    sampling fields that do not fit its checks (e.g. a temperature with do_sample=false), which
    sources do contain."""
    write_json(os.path.join(path, GENERATION_CONFIG_FILE), generation_config)
    native.tokenizer.save(path)


def read_hf_weights(path: str) -> StateDict:
    """Every tensor of an HF model directory: `model.safetensors`, a sharded safetensors index,
    or `pytorch_model.bin` (read with `weights_only=True`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load_one(file: str) -> StateDict:
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise CheckpointError(f"{path}: weight file {file} is missing")
        try:
            if file.endswith(".safetensors"):
                return load_file(full)
            return torch.load(full, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
            # truncated downloads are the usual cause; safetensors / torch say why in one line
            raise CheckpointError(f"cannot read weight file {full}: {exc}") from exc

    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: missing key 'weight_map'")
            state: StateDict = {}
            for file in sorted(set(weight_map.values())):
                state.update(load_one(file))
            return state
    for single in (SAFETENSORS_FILE, TORCH_FILE):
        if os.path.isfile(os.path.join(path, single)):
            return load_one(single)
    raise CheckpointError(f"{path}: no weights found (expected {SAFETENSORS_FILE}, "
                          f"{SAFETENSORS_INDEX} or {TORCH_FILE})")


def write_hf_weights(state: Mapping[str, torch.Tensor], path: str,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> List[str]:
    """Write `state` as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards
    plus `model.safetensors.index.json` when larger than `max_shard_bytes`. Returns the files."""
    from mindspeed_vita.convert.safetensors_file import save_safetensors

    os.makedirs(path, exist_ok=True)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], os.path.join(path, SAFETENSORS_FILE), metadata={"format": "pt"})
        return [SAFETENSORS_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        save_safetensors(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(path, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [SAFETENSORS_INDEX]


def params_dtype_of(config_dtype, state: Mapping[str, torch.Tensor], where: str) -> str:
    """`params_dtype` from config.json's dtype (string or torch dtype), else from the tensors."""
    if config_dtype is not None:
        name = (dtype_name(config_dtype) if isinstance(config_dtype, torch.dtype)
                else str(config_dtype))
        if name in ("float32", "bfloat16", "float16"):
            return name
        raise CheckpointError(f"{where}: dtype {name!r} is not float32, bfloat16 or float16")
    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtype_name(floating.pop()) if len(floating) == 1 else "float32"


# ----------------------------------------------------------- tokenizer + vocabulary
def load_import_tokenizer(path: str):
    """The tokenizer of the HF directory `path` with the Long-VITA tokens added.

    Returns `(tokenizer, added_ids, source_size)`: the `VitaTokenizer`, the ids the source
    tokenizer lacked, and the number of ids the source tokenizer had.
    """
    from transformers import AutoTokenizer

    from mindspeed_vita.data.tokenizer import LONG_VITA_SPECIAL_TOKENS, load_tokenizer

    tokenizer = load_tokenizer(path)
    source = AutoTokenizer.from_pretrained(path)
    source_vocab = source.get_vocab()
    added = sorted(tokenizer.token_to_id(t) for t in LONG_VITA_SPECIAL_TOKENS
                   if t not in source_vocab)
    return tokenizer, added, len(source)


def fit_vocabulary(qwen2_state: StateDict, cfg: LanguageConfig, added_ids: List[int],
                   source_size: int, tokenizer_size: int) -> Tuple[StateDict, LanguageConfig]:
    """Give the tokens the import added (`added_ids`) embedding / output rows: the mean of the
    rows of the `source_size` tokens the source tokenizer had. Grows the vocabulary to
    `tokenizer_size` when a new id is past it. Operates on an HF Qwen2 state dict."""
    if not added_ids:
        return qwen2_state, cfg
    vocab = max(cfg.vocab_size, tokenizer_size)
    keys = ["model.embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    state = dict(qwen2_state)
    for key in keys:
        if key not in state:
            continue  # qwen2_to_native_language names the missing tensor
        table = state[key]
        if vocab > table.shape[0]:
            table = torch.cat((table, table.new_zeros(vocab - table.shape[0], table.shape[1])))
        else:
            table = table.clone()
        known = min(source_size, cfg.vocab_size)
        mean = table[:known].float().mean(dim=0).to(table.dtype)
        table[torch.tensor(added_ids)] = mean
        state[key] = table
    return state, cfg.model_copy(update={"vocab_size": vocab})


# ------------------------------------------------------ config keys in messages
#: native config key -> the key of an HF InternVL config.json that sets it
INTERNVL_CONFIG_KEYS = {
    "vision.hidden_size": "vision_config.hidden_size",
    "vision.intermediate_size": "vision_config.intermediate_size",
    "vision.num_layers": "vision_config.num_hidden_layers",
    "vision.num_heads": "vision_config.num_attention_heads",
    "vision.image_size": "vision_config.image_size",
    "vision.patch_size": "vision_config.patch_size",
    "vision.qkv_bias": "vision_config.attention_bias",
    "projector.variant": f"{EXTRA_CONFIG_KEY}.projector_variant",
    "projector.downsample_ratio": "downsample_ratio",
    "language.hidden_size": "text_config.hidden_size",
    "language.ffn_hidden_size": "text_config.intermediate_size",
    "language.num_attention_heads": "text_config.num_attention_heads",
    "language.num_query_groups": "text_config.num_key_value_heads",
    "language.vocab_size": "text_config.vocab_size",
    "language.num_layers": "text_config.num_hidden_layers",
    "language.tie_word_embeddings": "tie_word_embeddings",
    "language.make_vocab_size_divisible_by": f"{EXTRA_CONFIG_KEY}.make_vocab_size_divisible_by",
}
#: native config key -> the key of a Qwen2 causal-LM config.json
QWEN2_CONFIG_KEYS = {k: v.removeprefix("text_config.") for k, v in INTERNVL_CONFIG_KEYS.items()
                     if v.startswith("text_config.")}
#: native config key -> the key of an original InternViT config.json
INTERNVIT_CONFIG_KEYS = {k: v.removeprefix("vision_config.") for k, v in
                         INTERNVL_CONFIG_KEYS.items() if v.startswith("vision_config.")}
INTERNVIT_CONFIG_KEYS["vision.qkv_bias"] = "qkv_bias"


def source_config_keys(message: str, key_names: Mapping[str, str], config_file: str) -> str:
    """`message` with each native config key ("language.ffn_hidden_size=96") spelled as in the
    source `config_file` ("text_config.intermediate_size=96"), the file named at the end."""
    alternatives = "|".join(re.escape(k) for k in sorted(key_names, key=len, reverse=True))
    pattern = re.compile(r"\b(" + alternatives + r")=")
    renamed, count = pattern.subn(lambda m: key_names[m.group(1)] + "=", message)
    return f"{renamed} (set in {config_file})" if count else message


def expected_native_shapes(cfg: ModelConfig, parts: Tuple[str, ...] = ("vision", "projector",
                                                                         "language")
                           ) -> Dict[str, tuple]:
    """Shape of every tensor of the full (tp=1) native state of `cfg`, for the given parts.
    Vision and projector come from their modules built on the meta device (no memory even at
    full size), the language from `qwen2_weights.native_language_shapes`."""
    from mindspeed_vita.convert.qwen2_weights import native_language_shapes
    from mindspeed_vita.models.projector import VisionProjector
    from mindspeed_vita.models.vision import InternViT

    shapes: Dict[str, tuple] = {}
    with torch.device("meta"):
        if "vision" in parts:
            shapes.update({"vision." + k: tuple(v.shape)
                           for k, v in InternViT(cfg.vision, None).state_dict().items()})
        if "projector" in parts:
            projector = VisionProjector(cfg.projector, cfg.vision.hidden_size,
                                        cfg.language.hidden_size)
            shapes.update({"projector." + k: tuple(v.shape)
                           for k, v in projector.state_dict().items()})
    if "language" in parts:
        shapes.update({"language." + k: v
                       for k, v in native_language_shapes(cfg.language).items()})
    return shapes


def check_native_shapes(state: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str, *,
                        parts: Tuple[str, ...] = ("vision", "projector", "language"),
                        config_file: Optional[str] = None,
                        key_names: Optional[Mapping[str, str]] = None) -> None:
    """CheckpointError unless the tensors of the full native `state` under `parts` are exactly
    those `cfg` builds, with the same shapes. The message names the tensor, both shapes and the
    config keys that set them, spelled as in `config_file` when `key_names` maps them.

    Import runs it on the vision / projector tensors (the Qwen2 conversion checks the language)
    and export on everything, so a directory whose config disagrees with its weights is
    refused before anything is written."""
    from mindspeed_vita.convert.checkpoint import config_keys_for, config_value

    expected = expected_native_shapes(cfg, parts)
    got = {k: tuple(v.shape) for k, v in state.items() if k.split(".", 1)[0] in parts}

    def keys(name: str) -> str:
        names = config_keys_for(name, shape=False) or config_keys_for(name, shape=True)
        return describe(names)

    def describe(names) -> str:
        text = ", ".join(f"{k}={config_value(cfg, k)!r}" for k in names)
        if key_names and config_file:
            text = source_config_keys(text, key_names, config_file)
        return text

    for name in expected:
        if name not in got:
            raise CheckpointError(f"{where}: no tensor {name!r}, which the config calls for "
                                  f"({keys(name)})")
        if got[name] != expected[name]:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {got[name]} but the "
                                  f"config gives {expected[name]}: the shape follows "
                                  f"{describe(config_keys_for(name, shape=True))}")
    for name in got:
        if name not in expected:
            raise CheckpointError(f"{where}: tensor {name!r} is not part of the model the "
                                  f"config describes ({keys(name)})")


# ------------------------------------------------------------------- config
def _unsupported(where: str, key: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key}={value!r} is not supported ({why})")


def _square(value, where: str, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise _unsupported(where, key, list(value), "only square tiles and patches")
        return int(value[0])
    return int(value)


def language_config_from_qwen2(text, *, tie_word_embeddings: bool, where: str,
                               prefix: str = "") -> LanguageConfig:
    """`LanguageConfig` from a transformers `Qwen2Config`; `prefix` ("text_config.") names keys."""
    if getattr(text, "model_type", "qwen2") != "qwen2":
        raise _unsupported(where, prefix + "model_type", text.model_type, "the LLM must be Qwen2")
    if text.hidden_act != "silu":
        raise _unsupported(where, prefix + "hidden_act", text.hidden_act, "Qwen2 uses silu")
    if getattr(text, "use_sliding_window", False):
        raise _unsupported(where, prefix + "use_sliding_window", True, "no sliding window")
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise _unsupported(where, prefix + "rope_parameters.rope_type", rope.get("rope_type"),
                           "RoPE scaling is not implemented")
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None)
    if head_dim is not None and head_dim * heads != text.hidden_size:
        raise _unsupported(where, prefix + "head_dim", head_dim,
                           "head_dim must be hidden_size / num_attention_heads")
    try:
        return LanguageConfig(
            hidden_size=text.hidden_size, num_layers=text.num_hidden_layers,
            num_attention_heads=heads,
            num_query_groups=getattr(text, "num_key_value_heads", None) or heads,
            ffn_hidden_size=text.intermediate_size, vocab_size=text.vocab_size,
            rms_norm_eps=text.rms_norm_eps, rotary_base=float(theta),
            max_position_embeddings=text.max_position_embeddings, qkv_bias=True,
            tie_word_embeddings=bool(tie_word_embeddings))
    except ValueError as exc:
        raise CheckpointError(f"{where}: {prefix.rstrip('.') or 'config'} is invalid: {exc}") \
            from exc


def model_config_from_internvl(hf, where: str) -> ModelConfig:
    """`ModelConfig` from a transformers `InternVLConfig` (read from `where`), refusing the
    InternVL options our model does not implement, with the config.json key in the message."""
    vision = hf.vision_config
    checks = [
        ("vision_config.use_qk_norm", vision.use_qk_norm, False, "InternViT-300M has no qk-norm"),
        ("vision_config.norm_type", vision.norm_type, "layer_norm", "InternViT uses LayerNorm"),
        ("vision_config.hidden_act", vision.hidden_act, "gelu", "InternViT's MLP uses GELU"),
        ("vision_config.use_mean_pooling", vision.use_mean_pooling, True,
         "a final vision LayerNorm is not implemented"),
        ("vision_config.use_absolute_position_embeddings",
         vision.use_absolute_position_embeddings, True, "InternViT has learned positions"),
        ("vision_config.use_mask_token", vision.use_mask_token, False, "no mask token"),
        ("vision_feature_select_strategy", hf.vision_feature_select_strategy, "default",
         "the CLS token is always dropped"),
        ("projector_hidden_act", hf.projector_hidden_act, "gelu", "the projector uses GELU"),
    ]
    for key, value, wanted, why in checks:
        if value != wanted:
            raise _unsupported(where, key, value, why)
    if not isinstance(hf.vision_feature_layer, int):
        raise _unsupported(where, "vision_feature_layer", hf.vision_feature_layer,
                           "a single layer is used")
    extra = dict(_EXTRA_DEFAULTS)
    stored = getattr(hf, EXTRA_CONFIG_KEY, None) or {}
    unknown = sorted(set(stored) - set(_EXTRA_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{where}: unknown key {EXTRA_CONFIG_KEY}.{unknown[0]}")
    extra.update(stored)
    try:
        cfg = ModelConfig(
            vision=VisionConfig(
                image_size=_square(vision.image_size, where, "vision_config.image_size"),
                patch_size=_square(vision.patch_size, where, "vision_config.patch_size"),
                hidden_size=vision.hidden_size, num_layers=vision.num_hidden_layers,
                num_heads=vision.num_attention_heads,
                intermediate_size=vision.intermediate_size,
                layer_norm_eps=vision.layer_norm_eps, qkv_bias=bool(vision.attention_bias),
                layer_scale_init=vision.layer_scale_init_value,
                select_layer=hf.vision_feature_layer,
                encode_chunk_size=extra["encode_chunk_size"]),
            projector=ProjectorConfig(variant=extra["projector_variant"],
                                      downsample_ratio=hf.downsample_ratio,
                                      layer_norm_eps=extra["projector_layer_norm_eps"]),
            language=language_config_from_qwen2(
                hf.text_config, tie_word_embeddings=hf.tie_word_embeddings, where=where,
                prefix="text_config.").model_copy(
                    update={"make_vocab_size_divisible_by": extra["make_vocab_size_divisible_by"]}),
            image_layout=extra["image_layout"], min_tiles=extra["min_tiles"],
            max_tiles=extra["max_tiles"],
            params_dtype=params_dtype_of(getattr(hf, "dtype", None), {}, where))
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    if cfg.tokens_per_tile != hf.image_seq_length:
        raise CheckpointError(
            f"{where}: image_seq_length={hf.image_seq_length} disagrees with image_size, "
            f"patch_size and downsample_ratio, which give {cfg.tokens_per_tile} tokens per tile")
    return cfg


def _extra_config(cfg: ModelConfig) -> dict:
    """The EXTRA_CONFIG_KEY block: native settings HF InternVL cannot express, when they differ
    from what an HF InternVL import assumes."""
    values = {"projector_variant": cfg.projector.variant, "image_layout": cfg.image_layout,
              "projector_layer_norm_eps": cfg.projector.layer_norm_eps,
              "min_tiles": cfg.min_tiles, "max_tiles": cfg.max_tiles,
              "make_vocab_size_divisible_by": cfg.language.make_vocab_size_divisible_by,
              "encode_chunk_size": cfg.vision.encode_chunk_size}
    return {k: v for k, v in values.items() if v != _EXTRA_DEFAULTS[k]}


def internvl_config_from_model_config(cfg: ModelConfig, *, image_token_id: int,
                                      source: Optional[dict] = None):
    """A transformers `InternVLConfig` describing `cfg`; fields of `source` (the config.json
    the model was imported from) that mindspeed-vita does not model are kept."""
    from transformers import InternVLConfig

    v, lang = cfg.vision, cfg.language
    vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
                  image_size=[v.image_size, v.image_size], patch_size=[v.patch_size, v.patch_size],
                  layer_norm_eps=v.layer_norm_eps, attention_bias=v.qkv_bias,
                  layer_scale_init_value=v.layer_scale_init, use_qk_norm=False,
                  norm_type="layer_norm", hidden_act="gelu", use_mean_pooling=True,
                  use_absolute_position_embeddings=True, use_mask_token=False)
    text = dict(model_type="qwen2", hidden_size=lang.hidden_size,
                num_hidden_layers=lang.num_layers, num_attention_heads=lang.num_attention_heads,
                num_key_value_heads=lang.num_query_groups, intermediate_size=lang.ffn_hidden_size,
                vocab_size=lang.vocab_size, rms_norm_eps=lang.rms_norm_eps,
                max_position_embeddings=lang.max_position_embeddings, hidden_act="silu",
                tie_word_embeddings=lang.tie_word_embeddings)
    top = dict(image_token_id=image_token_id, image_seq_length=cfg.tokens_per_tile,
               downsample_ratio=cfg.projector.downsample_ratio, projector_hidden_act="gelu",
               vision_feature_layer=v.select_layer, vision_feature_select_strategy="default",
               tie_word_embeddings=lang.tie_word_embeddings, dtype=cfg.params_dtype)
    merged = {k: val for k, val in (source or {}).items()
              if k not in (EXTRA_CONFIG_KEY, "transformers_version")}
    merged_vision = dict(merged.get("vision_config") or {}, **vision)
    merged_text = dict(merged.get("text_config") or {}, **text)
    rope = dict(merged_text.get("rope_parameters") or {})
    rope.update(rope_theta=lang.rotary_base, rope_type="default")
    merged_text["rope_parameters"] = rope
    merged_text.pop("rope_theta", None)
    merged_text.pop("rope_scaling", None)
    merged.update(top, vision_config=merged_vision, text_config=merged_text)
    merged["architectures"] = ["InternVLForConditionalGeneration"]
    merged.pop("model_type", None)
    extra = _extra_config(cfg)
    if extra:
        merged[EXTRA_CONFIG_KEY] = extra
    return InternVLConfig(**merged)


# -------------------------------------------------------------------- weights
def _detect_prefixes(state: Mapping[str, torch.Tensor], where: str) -> Dict[str, str]:
    for prefixes in (HUB_PREFIXES, MODULE_PREFIXES):
        if any(k.startswith(prefixes["language"]) for k in state):
            return prefixes
    raise CheckpointError(f"{where}: no Qwen2 weights under 'language_model.model.' or "
                          f"'model.language_model.'; is it an InternVL checkpoint?")


class InternVLParts(NamedTuple):
    """An HF InternVL state dict split by part."""

    vision: StateDict
    """Vision-tower tensors, keys under `model.vision_tower.`."""
    projector: StateDict
    """Projector tensors, keys under `projector_prefix`."""
    projector_prefix: str
    """`multi_modal_projector.`-style HF prefix, or LONG_VITA_PROJECTOR_PREFIX."""
    qwen2: StateDict
    """The language model as an HF Qwen2 causal-LM state dict (`model.*`, `lm_head.*`)."""


def split_internvl_state(state: Mapping[str, torch.Tensor], where: str) -> InternVLParts:
    """Split an HF InternVL state dict (either spelling) into its parts; CheckpointError names
    any tensor that belongs to none of them."""
    prefixes = _detect_prefixes(state, where)
    vision, projector, qwen2 = {}, {}, {}
    projector_prefix = None
    for key, tensor in state.items():
        if key.startswith(prefixes["vision"]):
            vision[MODULE_PREFIXES["vision"] + key[len(prefixes["vision"]):]] = tensor
        elif key.startswith((prefixes["projector"], LONG_VITA_PROJECTOR_PREFIX)):
            found = (LONG_VITA_PROJECTOR_PREFIX if key.startswith(LONG_VITA_PROJECTOR_PREFIX)
                     else prefixes["projector"])
            if projector_prefix not in (None, found):
                raise CheckpointError(f"{where}: holds both {projector_prefix!r} and {found!r} "
                                      f"projector weights; keep one")
            projector_prefix = found
            projector[key] = tensor
        elif key.startswith(prefixes["language"]):
            qwen2["model." + key[len(prefixes["language"]):]] = tensor
        elif key.startswith(prefixes["lm_head"]):
            qwen2["lm_head." + key[len(prefixes["lm_head"]):]] = tensor
        else:
            raise CheckpointError(f"{where}: tensor {key!r} is not part of an InternVL model")
    if projector_prefix is None:
        raise CheckpointError(f"{where}: no projector weights (neither "
                              f"{prefixes['projector']!r} nor {LONG_VITA_PROJECTOR_PREFIX!r})")
    return InternVLParts(vision, projector, projector_prefix, qwen2)


def parts_to_native(parts: InternVLParts, cfg: ModelConfig, where: str,
                    config_file: Optional[str] = None) -> StateDict:
    """The parts of an HF InternVL state -> the full (tp=1) `LongVitaModel` state; every tensor
    is checked against `cfg` (CheckpointError naming the tensor and the config.json keys of
    `config_file` that set its shape)."""
    long_vita = parts.projector_prefix == LONG_VITA_PROJECTOR_PREFIX
    if long_vita != (cfg.projector.variant == "long-vita"):
        raise CheckpointError(
            f"{where}: projector tensors are under {parts.projector_prefix!r} but the config "
            f"says projector variant {cfg.projector.variant!r} (a 'long-vita' projector is "
            f"stored under {LONG_VITA_PROJECTOR_PREFIX!r} with "
            f"{EXTRA_CONFIG_KEY}.projector_variant='long-vita' in config.json)")
    native: StateDict = {}
    try:
        native.update({"vision." + k: v for k, v in hf_to_native_vision(parts.vision).items()})
        native.update({"projector." + k: v for k, v in
                       hf_to_native_projector(parts.projector, parts.projector_prefix).items()})
    except WeightMappingError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    names = INTERNVL_CONFIG_KEYS if config_file else None
    check_native_shapes(native, cfg, where, parts=("vision", "projector"),
                        config_file=config_file, key_names=names)
    native.update(qwen2_to_native_language(parts.qwen2, cfg.language, where,
                                           config_file=config_file, key_names=names))
    return native


def internvl_to_native(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                       where: str = "HF InternVL state") -> StateDict:
    """HF InternVL tensors (either spelling) -> the full (tp=1) `LongVitaModel` state."""
    return parts_to_native(split_internvl_state(state, where), cfg, where)


def qwen2_to_native_language(qwen2: Mapping[str, torch.Tensor], cfg: LanguageConfig,
                             where: str, *, config_file: Optional[str] = None,
                             key_names: Optional[Mapping[str, str]] = None) -> StateDict:
    """HF Qwen2 causal-LM tensors -> `language.*` tensors at tp=1 (CheckpointError on a bad or
    unknown key; config keys in the message are spelled as in `config_file` when `key_names`
    maps them)."""
    try:
        language = hf_to_native_qwen2(qwen2, cfg, 0, 1)
    except (KeyError, ValueError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        if key_names and config_file:
            message = source_config_keys(message, key_names, config_file)
        raise CheckpointError(f"{where}: {message}") from exc
    return {"language." + k: v for k, v in language.items()}


def split_native_state(state: Mapping[str, torch.Tensor]) -> Dict[str, StateDict]:
    """The full native state by part, `{"vision": .., "projector": .., "language": ..}`, each
    without its part prefix; CheckpointError on a tensor under none of them."""
    parts: Dict[str, StateDict] = {"vision": {}, "projector": {}, "language": {}}
    for key, tensor in state.items():
        part, _, rest = key.partition(".")
        if part not in parts:
            raise CheckpointError(f"native tensor {key!r} is not under vision., projector. "
                                  f"or language.")
        parts[part][rest] = tensor
    return parts


def native_to_internvl(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """The full (tp=1) `LongVitaModel` state -> HF InternVL tensors, on-disk spelling."""
    parts = split_native_state(state)
    out: StateDict = {}
    try:
        out.update(native_to_hf_vision(parts["vision"], prefix=HUB_PREFIXES["vision"]))
        projector_prefix = (LONG_VITA_PROJECTOR_PREFIX if cfg.projector.variant == "long-vita"
                            else HUB_PREFIXES["projector"])
        out.update(native_to_hf_projector(parts["projector"], prefix=projector_prefix))
        qwen2 = native_to_hf_qwen2([parts["language"]], cfg.language)
    except (WeightMappingError, KeyError, ValueError) as exc:
        raise CheckpointError(f"native state: {exc.args[0] if exc.args else exc}") from exc
    for key, tensor in qwen2.items():
        if key.startswith("model."):
            out[HUB_PREFIXES["language"] + key[len("model."):]] = tensor
        else:
            out[HUB_PREFIXES["lm_head"] + key[len("lm_head."):]] = tensor
    return out


# ---------------------------------------------------------------- directories
def is_internvl_dir(path: str) -> bool:
    """True when `path/config.json` declares an InternVL model (`model_type: internvl`)."""
    config = os.path.join(path, CONFIG_FILE)
    return os.path.isfile(config) and read_json(config).get("model_type") == "internvl"


def read_hf_config(path: str, model_type: str, config_class, what: str):
    """`(where, raw dict, transformers config)` of `path/config.json`, which must declare
    `model_type`; CheckpointError naming the file otherwise. `what` names the directory kind
    in messages (e.g. "InternVL", "Qwen2 causal-LM")."""
    where = os.path.join(path, CONFIG_FILE)
    source = read_json(where)
    if source.get("model_type") != model_type:
        raise CheckpointError(f"{where}: model_type is {source.get('model_type')!r}, expected "
                              f"{model_type!r} (a {what} directory)")
    try:
        return where, source, config_class.from_dict(source)
    except Exception as exc:  # transformers raises several types for a bad config
        raise CheckpointError(f"{where}: not a valid {what} config: {exc}") from exc


def import_internvl(path: str) -> NativeModel:
    """Read an HF InternVL directory (config.json, weights, tokenizer) as a `NativeModel`."""
    from transformers import InternVLConfig

    where, source, hf = read_hf_config(path, "internvl", InternVLConfig, "InternVL")
    cfg = model_config_from_internvl(hf, where)
    state = read_hf_weights(path)
    if getattr(hf, "dtype", None) is None:
        cfg = cfg.model_copy(update={"params_dtype": params_dtype_of(None, state, where)})
    tokenizer, added, source_size = load_import_tokenizer(path)
    if tokenizer.img_context_id != hf.image_token_id:
        raise CheckpointError(
            f"{where}: image_token_id={hf.image_token_id} but the tokenizer in {path} gives "
            f"'<IMG_CONTEXT>' the id {tokenizer.img_context_id}")
    where_weights = f"weights of {path}"
    parts = split_internvl_state(state, where_weights)
    qwen2, language = fit_vocabulary(parts.qwen2, cfg.language, added, source_size,
                                     len(tokenizer))
    cfg = cfg.model_copy(update={"language": language})
    native = parts_to_native(parts._replace(qwen2=qwen2), cfg, where_weights, config_file=where)
    return NativeModel(cfg=cfg, state=native, tokenizer=tokenizer, hf_source_config=source,
                       hf_generation_config=read_generation_config(path))


def read_generation_config(path: str) -> Optional[dict]:
    """generation_config.json of the HF directory `path` as a dict, or None when it has none."""
    file = os.path.join(path, GENERATION_CONFIG_FILE)
    return read_json(file) if os.path.isfile(file) else None


def generation_config_for(native: NativeModel) -> dict:
    """generation_config.json for an exported directory: the source's (when the model was
    imported from an HF directory that had one) with `eos_token_id` widened to the tokens that
    end `mindspeed-vita infer` (`<|im_end|>`, the tokenizer's eos, `<|endoftext|>`) and
    `pad_token_id` / `bos_token_id` filled in when absent, so transformers' `generate` stops
    where mindspeed-vita does. Sampling settings of the source are kept as they were."""
    config = {k: v for k, v in (native.hf_generation_config or {}).items()
              if k not in ("transformers_version", "_from_model_config")}
    tokenizer = native.tokenizer
    source_eos = config.get("eos_token_id")
    eos = set(source_eos if isinstance(source_eos, list) else
              [] if source_eos is None else [source_eos])
    config["eos_token_id"] = sorted(eos | set(tokenizer.stop_token_ids))
    if config.get("pad_token_id") is None:
        config["pad_token_id"] = int(tokenizer.pad_id)
    if config.get("bos_token_id") is None and tokenizer.bos_id is not None:
        config["bos_token_id"] = int(tokenizer.bos_id)
    return config


def export_internvl(native: NativeModel, path: str, where: str = "native state") -> List[str]:
    """Write `native` as an HF InternVL directory (config.json, weights, tokenizer files).
    Returns the weight files written. A state whose tensors disagree with its config is
    refused first (CheckpointError naming `where`, the tensor and the config keys). The
    generation_config.json written is `generation_config_for(native)`."""
    check_native_shapes(native.state, native.cfg, where)
    os.makedirs(path, exist_ok=True)
    config = internvl_config_from_model_config(
        native.cfg, image_token_id=int(native.tokenizer.img_context_id),
        source=native.hf_source_config)
    files = write_hf_weights(native_to_internvl(native.state, native.cfg), path)
    config.save_pretrained(path)
    write_generation_config_and_tokenizer(native, path, generation_config_for(native))
    return files
