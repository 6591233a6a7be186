"""Weight-name mapping between our vision modules and the checkpoints they come from.

Native names are those of `models.vision.InternViT` and `models.projector.VisionProjector`
(documented in those modules; no prefix). Three foreign namings are supported:

* HF InternVL port (`InternVLForConditionalGeneration`, transformers >= 4.52): vision tower under
  `model.vision_tower.` with q/k/v split, `lambda_1/2`, `layernorm_before/after`; projector under
  `model.multi_modal_projector.` as `layer_norm`, `linear_1`, `linear_2`.
* Original InternViT (`InternViT-300M-448px` directories, or `vision_model.` inside InternVL
  chat checkpoints): fused `attn.qkv`, `ls1/ls2`, `norm1/norm2`.
* Original InternVL projector `mlp1.{0,1,3}` (LayerNorm, Linear, Linear; index 2 is the GELU).

Every conversion is a pure rename except the q/k/v split/concatenation (along dim 0, in q, k, v
order), so native -> foreign -> native round-trips bit-exactly. Keys outside `prefix` are
ignored; any unrecognised key under it raises `WeightMappingError` naming that key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping

import torch

StateDict = Dict[str, torch.Tensor]


class WeightMappingError(ValueError):
    """A checkpoint key (or a missing one) that the mapping cannot place; the message names it."""


@dataclass(frozen=True)
class _VisionNaming:
    """How one checkpoint family names the InternViT parameters (native name -> foreign name)."""

    label: str
    embeddings: Mapping[str, str]
    layer_prefix: str
    """Foreign prefix of layer i, with `{}` for the index."""
    layer: Mapping[str, str]
    """Native suffix -> foreign suffix inside one layer (fused qkv excluded when split_qkv)."""
    split_qkv: bool
    """True: the foreign checkpoint stores q, k, v projections separately."""


_WEIGHT_BIAS = ("weight", "bias")

_HF_VISION = _VisionNaming(
    label="HF InternVL vision tower",
    embeddings={
        "class_embedding": "embeddings.cls_token",
        "position_embedding": "embeddings.position_embeddings",
        "patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embedding.bias": "embeddings.patch_embeddings.projection.bias",
    },
    layer_prefix="encoder.layer.{}.",
    layer={
        "attn_scale": "lambda_1",
        "mlp_scale": "lambda_2",
        **{f"attn_norm.{p}": f"layernorm_before.{p}" for p in _WEIGHT_BIAS},
        **{f"mlp_norm.{p}": f"layernorm_after.{p}" for p in _WEIGHT_BIAS},
        **{f"attn.proj.{p}": f"attention.projection_layer.{p}" for p in _WEIGHT_BIAS},
        **{f"mlp.fc{i}.{p}": f"mlp.fc{i}.{p}" for i in (1, 2) for p in _WEIGHT_BIAS},
    },
    split_qkv=True,
)

_INTERNVIT_VISION = _VisionNaming(
    label="original InternViT",
    embeddings={
        "class_embedding": "embeddings.class_embedding",
        "position_embedding": "embeddings.position_embedding",
        "patch_embedding.weight": "embeddings.patch_embedding.weight",
        "patch_embedding.bias": "embeddings.patch_embedding.bias",
    },
    layer_prefix="encoder.layers.{}.",
    layer={
        "attn_scale": "ls1",
        "mlp_scale": "ls2",
        **{f"attn_norm.{p}": f"norm1.{p}" for p in _WEIGHT_BIAS},
        **{f"mlp_norm.{p}": f"norm2.{p}" for p in _WEIGHT_BIAS},
        **{f"attn.qkv.{p}": f"attn.qkv.{p}" for p in _WEIGHT_BIAS},
        **{f"attn.proj.{p}": f"attn.proj.{p}" for p in _WEIGHT_BIAS},
        **{f"mlp.fc{i}.{p}": f"mlp.fc{i}.{p}" for i in (1, 2) for p in _WEIGHT_BIAS},
    },
    split_qkv=False,
)

_HF_QKV = re.compile(r"attention\.([qkv])_proj\.(weight|bias)")
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")

_HF_PROJECTOR = {"norm": "layer_norm", "fc1": "linear_1", "fc2": "linear_2"}
_MLP1_PROJECTOR = {"norm": "0", "fc1": "1", "fc2": "3"}


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str, label: str) -> StateDict:
    """The entries under `prefix`, with it removed; error if there are none."""
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise WeightMappingError(f"no {label} weights under prefix {prefix!r} in the checkpoint")
    return selected


def _vision_to_native(state_dict: Mapping[str, torch.Tensor], prefix: str,
                      naming: _VisionNaming) -> StateDict:
    foreign = _strip_prefix(state_dict, prefix, naming.label)
    embeddings = {v: k for k, v in naming.embeddings.items()}
    layer_suffixes = {v: k for k, v in naming.layer.items()}
    layer_key = re.compile(re.escape(naming.layer_prefix).replace(r"\{\}", r"(\d+)") + "(.+)")
    native: StateDict = {}
    qkv_parts: Dict[tuple, Dict[str, torch.Tensor]] = {}
    for key, tensor in foreign.items():
        if key in embeddings:
            native[embeddings[key]] = tensor
            continue
        match = layer_key.fullmatch(key)
        if match is not None:
            index, suffix = int(match.group(1)), match.group(2)
            if suffix in layer_suffixes:
                native[f"layers.{index}.{layer_suffixes[suffix]}"] = tensor
                continue
            qkv = _HF_QKV.fullmatch(suffix) if naming.split_qkv else None
            if qkv is not None:
                qkv_parts.setdefault((index, qkv.group(2)), {})[qkv.group(1)] = tensor
                continue
        raise WeightMappingError(
            f"checkpoint key {prefix + key!r} is not a known {naming.label} weight")
    for (index, kind), parts in sorted(qkv_parts.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            layer_prefix = prefix + naming.layer_prefix.format(index)
            absent = f"{layer_prefix}attention.{missing[0]}_proj.{kind}"
            raise WeightMappingError(f"checkpoint key {absent!r} is missing (needed for fused qkv)")
        native[f"layers.{index}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in "qkv"], dim=0)
    return native


def _vision_from_native(state_dict: Mapping[str, torch.Tensor], prefix: str,
                        naming: _VisionNaming) -> StateDict:
    foreign: StateDict = {}
    for key, tensor in state_dict.items():
        if key in naming.embeddings:
            foreign[prefix + naming.embeddings[key]] = tensor
            continue
        match = _NATIVE_LAYER.fullmatch(key)
        if match is not None:
            index, suffix = int(match.group(1)), match.group(2)
            layer_prefix = prefix + naming.layer_prefix.format(index)
            if suffix in naming.layer:
                foreign[layer_prefix + naming.layer[suffix]] = tensor
                continue
            if naming.split_qkv and suffix in ("attn.qkv.weight", "attn.qkv.bias"):
                if tensor.shape[0] % 3:
                    raise WeightMappingError(
                        f"{key!r} has {tensor.shape[0]} rows, not a multiple of 3 (q, k, v)")
                kind = suffix.rsplit(".", 1)[1]
                # clone: the three slices must not share storage (safetensors refuses that)
                for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                    foreign[f"{layer_prefix}attention.{name}_proj.{kind}"] = part.clone()
                continue
        raise WeightMappingError(f"{key!r} is not an InternViT parameter name")
    return foreign


def hf_to_native_vision(state_dict_hf: Mapping[str, torch.Tensor],
                        prefix: str = "model.vision_tower.") -> StateDict:
    """HF InternVL vision-tower weights (keys under `prefix`) -> `InternViT` state dict."""
    return _vision_to_native(state_dict_hf, prefix, _HF_VISION)


def native_to_hf_vision(state_dict_native: Mapping[str, torch.Tensor],
                        prefix: str = "model.vision_tower.") -> StateDict:
    """`InternViT` state dict -> HF InternVL vision-tower weights under `prefix`."""
    return _vision_from_native(state_dict_native, prefix, _HF_VISION)


def hf_internvit_to_native(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> StateDict:
    """Original InternViT weights -> `InternViT` state dict.

    `prefix` is "" for an InternViT-300M-448px directory and "vision_model." inside an
    InternVL chat checkpoint.
    """
    return _vision_to_native(state_dict, prefix, _INTERNVIT_VISION)


def native_to_hf_internvit(state_dict_native: Mapping[str, torch.Tensor],
                           prefix: str = "") -> StateDict:
    """`InternViT` state dict -> original InternViT naming under `prefix`."""
    return _vision_from_native(state_dict_native, prefix, _INTERNVIT_VISION)


def _rename_modules(state_dict: Mapping[str, torch.Tensor], prefix: str,
                    modules: Mapping[str, str], label: str) -> StateDict:
    """Rename `{prefix}{module}.{param}` to `{modules[module]}.{param}`."""
    renamed: StateDict = {}
    for key, tensor in _strip_prefix(state_dict, prefix, label).items():
        module, _, param = key.partition(".")
        if module not in modules or param not in ("weight", "bias"):
            raise WeightMappingError(
                f"checkpoint key {prefix + key!r} is not a known {label} weight")
        renamed[f"{modules[module]}.{param}"] = tensor
    return renamed


def _add_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    return {prefix + k: v for k, v in state_dict.items()}


def hf_to_native_projector(state_dict_hf: Mapping[str, torch.Tensor],
                           prefix: str = "model.multi_modal_projector.") -> StateDict:
    """HF `multi_modal_projector.{layer_norm,linear_1,linear_2}` -> `VisionProjector` state dict."""
    return _rename_modules(state_dict_hf, prefix, {v: k for k, v in _HF_PROJECTOR.items()},
                           "HF InternVL projector")


def native_to_hf_projector(state_dict_native: Mapping[str, torch.Tensor],
                           prefix: str = "model.multi_modal_projector.") -> StateDict:
    """`VisionProjector` state dict -> HF `multi_modal_projector.*` names under `prefix`."""
    return _add_prefix(_rename_modules(state_dict_native, "", _HF_PROJECTOR, "VisionProjector"),
                       prefix)


def internvl_mlp1_to_native_projector(state_dict: Mapping[str, torch.Tensor],
                                      prefix: str = "mlp1.") -> StateDict:
    """Original InternVL `mlp1.{0,1,3}` -> `VisionProjector` state dict."""
    return _rename_modules(state_dict, prefix, {v: k for k, v in _MLP1_PROJECTOR.items()},
                           "InternVL mlp1 projector")


def native_projector_to_internvl_mlp1(state_dict_native: Mapping[str, torch.Tensor],
                                      prefix: str = "mlp1.") -> StateDict:
    """`VisionProjector` state dict -> original InternVL `mlp1.{0,1,3}` names under `prefix`."""
    return _add_prefix(_rename_modules(state_dict_native, "", _MLP1_PROJECTOR, "VisionProjector"),
                       prefix)
