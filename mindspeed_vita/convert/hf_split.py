"""A Qwen2 causal-LM directory + an InternViT directory -> native state: the stage-1 start.

Long-VITA starts from two separately released models: Qwen2.5-14B-Instruct (an HF
`Qwen2ForCausalLM` directory) and InternViT-300M-448px (a directory in the original InternViT
naming: `embeddings.*`, `encoder.layers.N.attn.qkv`, `ls1/ls2`, `norm1/norm2`, `mlp.fc1/fc2`,
with its own config.json). `import_split` reads both, creates a fresh projector of the chosen
variant (seeded, PyTorch's default initialisation of LayerNorm and Linear), and takes the
tokenizer from the Qwen2 directory with the Long-VITA tokens added; the embedding / output rows
of the added tokens are the mean of the existing rows (`hf_internvl.fit_vocabulary`).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from mindspeed_vita.config.model import ModelConfig, ProjectorConfig, VisionConfig
from mindspeed_vita.convert.checkpoint import NativeModel, StateDict
from mindspeed_vita.convert.hf_internvl import (
    CONFIG_FILE, INTERNVIT_CONFIG_KEYS, QWEN2_CONFIG_KEYS, check_native_shapes, fit_vocabulary,
    language_config_from_qwen2, load_import_tokenizer, params_dtype_of, qwen2_to_native_language,
    read_generation_config, read_hf_config, read_hf_weights, read_json)
from mindspeed_vita.convert.vision_weights import WeightMappingError, hf_internvit_to_native
from mindspeed_vita.errors import CheckpointError

#: model_type / architecture names of an original InternViT directory
INTERNVIT_MODEL_TYPES = ("intern_vit_6b",)
INTERNVIT_ARCHITECTURES = ("InternVisionModel",)


def is_internvit_config(config: dict) -> bool:
    """True when a config.json dict describes an original InternViT vision model."""
    return (config.get("model_type") in INTERNVIT_MODEL_TYPES
            or any(a in INTERNVIT_ARCHITECTURES for a in config.get("architectures") or ()))


def vision_config_from_internvit(config: dict, where: str) -> VisionConfig:
    """`VisionConfig` from an original InternViT config.json dict (read from `where`)."""
    if not is_internvit_config(config):
        raise CheckpointError(f"{where}: not an InternViT config (model_type "
                              f"{config.get('model_type')!r}, expected 'intern_vit_6b')")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "image_size", "patch_size"):
        if key not in config:
            raise CheckpointError(f"{where}: missing key {key!r}")
    for key, wanted in (("qk_normalization", False), ("norm_type", "layer_norm"),
                        ("hidden_act", "gelu")):
        if config.get(key, wanted) != wanted:
            raise CheckpointError(f"{where}: {key}={config[key]!r} is not supported "
                                  f"(InternViT-300M uses {wanted!r})")
    try:
        return VisionConfig(
            image_size=config["image_size"], patch_size=config["patch_size"],
            hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            layer_norm_eps=config.get("layer_norm_eps", 1e-6),
            qkv_bias=bool(config.get("qkv_bias", True)),
            layer_scale_init=config.get("initializer_factor", 0.1))
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def read_internvit(path: str) -> Tuple[VisionConfig, StateDict]:
    """An original InternViT directory -> (`VisionConfig`, `InternViT` state dict)."""
    where = os.path.join(path, CONFIG_FILE)
    cfg = vision_config_from_internvit(read_json(where), where)
    try:
        state = hf_internvit_to_native(read_hf_weights(path))
    except WeightMappingError as exc:
        raise CheckpointError(f"weights of {path}: {exc}") from exc
    return cfg, state


def fresh_projector_state(cfg: ModelConfig, seed: int) -> StateDict:
    """A newly initialised projector of `cfg.projector.variant` (seeded; the global RNG is left
    as it was), in `cfg.params_dtype`."""
    from mindspeed_vita.models.projector import VisionProjector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = VisionProjector(cfg.projector, cfg.vision.hidden_size,
                                    cfg.language.hidden_size)
    dtype = getattr(torch, cfg.params_dtype)
    return {k: v.detach().to(dtype) for k, v in projector.state_dict().items()}


def import_split(qwen2_path: str, vision_path: str, *, projector_variant: str = "long-vita",
                 seed: int = 42) -> NativeModel:
    """Qwen2 causal-LM directory + InternViT directory -> `NativeModel` with a fresh projector.

    The config takes the vision shape from the InternViT config.json, the language shape from
    the Qwen2 config.json, projector `projector_variant` with downsample ratio 0.5, and the
    Long-VITA image layout. The Qwen2 config.json is kept as the text part of the HF source
    config, so an export keeps its bos/eos ids and similar fields; its generation_config.json
    (sampling defaults, eos ids) is kept too.
    """
    from transformers import Qwen2Config

    if projector_variant not in ("long-vita", "internvl"):
        raise CheckpointError(f"projector variant {projector_variant!r} is not 'long-vita' or "
                              f"'internvl'")
    where, source, text = read_hf_config(qwen2_path, "qwen2", Qwen2Config, "Qwen2 causal-LM")
    language = language_config_from_qwen2(
        text, tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)), where=where)
    qwen2 = read_hf_weights(qwen2_path)
    vision_cfg, vision_state = read_internvit(vision_path)
    tokenizer, added, source_size = load_import_tokenizer(qwen2_path)
    qwen2, language = fit_vocabulary(qwen2, language, added, source_size, len(tokenizer))
    try:
        cfg = ModelConfig(vision=vision_cfg,
                          projector=ProjectorConfig(variant=projector_variant),
                          language=language, image_layout="long-vita",
                          params_dtype=params_dtype_of(getattr(text, "dtype", None), qwen2, where))
    except ValueError as exc:
        raise CheckpointError(f"{vision_path} + {qwen2_path}: {exc}") from exc
    state: StateDict = {"vision." + k: v for k, v in vision_state.items()}
    check_native_shapes(state, cfg, f"weights of {vision_path}", parts=("vision",),
                        config_file=os.path.join(vision_path, CONFIG_FILE),
                        key_names=INTERNVIT_CONFIG_KEYS)
    state.update({"projector." + k: v for k, v in fresh_projector_state(cfg, seed).items()})
    state.update(qwen2_to_native_language(qwen2, language, f"weights of {qwen2_path}",
                                          config_file=where, key_names=QWEN2_CONFIG_KEYS))
    return NativeModel(cfg=cfg, state=state, tokenizer=tokenizer,
                       hf_source_config={"text_config": source},
                       hf_generation_config=read_generation_config(qwen2_path))
