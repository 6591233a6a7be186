"""Tiny random HF models saved as HF directories, shared by the conversion and parity tests.

Every builder is deterministic given its seed, runs on the CPU in well under a second, and
writes what a real checkpoint directory holds (config.json, safetensors weights, tokenizer):

* `save_tiny_internvl(dir)`: an `InternVLForConditionalGeneration` (InternViT + projector +
  Qwen2) saved by transformers' own `save_pretrained`, with a tiny Qwen2-like tokenizer that
  already holds the Long-VITA tokens (`image_token_id` = its `<IMG_CONTEXT>`).
* `save_tiny_qwen2(dir)`: a `Qwen2ForCausalLM` with the plain tiny tokenizer (no Long-VITA
  tokens, so importing it must add them).
* `save_tiny_internvit(dir)`: an InternViT-300M-style vision directory in the ORIGINAL naming
  (`embeddings.*`, `encoder.layers.N.attn.qkv`, ls1/ls2, norm1/norm2) with its config.json.

All weights are random and non-trivial (biases, norm weights, layer scales, CLS and position
embeddings), so a wrong mapping cannot hide behind an all-zeros or all-ones tensor.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
from safetensors.torch import save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
from transformers import Qwen2ForCausalLM

from mindspeed_vita.config.model import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from mindspeed_vita.data.tokenizer import VitaTokenizer, load_tokenizer
from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

#: InternViT shape: width 32, 2 layers, 4 heads, tiles of 56 px in 14 px patches (4 x 4 grid)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=56, patch_size=14, layer_norm_eps=1e-6)
#: Qwen2 shape: width 64, 2 layers, 4 query / 2 kv heads, vocabulary 1000
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, rms_norm_eps=1e-6, rope_theta=1e6,
            max_position_embeddings=4096)
#: context tokens per tile after the 0.5 pixel shuffle: (56 / 14 / 2) ** 2
TOKENS_PER_TILE = 4
IMAGE_SIZE = VISION["image_size"]


def random_weight(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """A seeded random value for the parameter `name` that keeps the model well conditioned:
    norm weights near 1, layer scales in [0.2, 0.8], embeddings N(0, 0.5), the rest N(0, 0.1)."""
    if name.endswith(("lambda_1", "lambda_2", "ls1", "ls2")):
        return 0.2 + 0.6 * torch.rand(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.2 * noise
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return 0.5 * noise
    return 0.1 * noise


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter of `module` with `random_weight` values (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(random_weight(name, param.shape, gen))


def save_tiny_tokenizer(out_dir: str, *, with_long_vita_tokens: bool) -> Optional[VitaTokenizer]:
    """Write the tiny Qwen2-like tokenizer to `out_dir`; with `with_long_vita_tokens` also add
    and save the Long-VITA tokens and return the loaded `VitaTokenizer`."""
    build_tiny_tokenizer(out_dir)
    if not with_long_vita_tokens:
        return None
    tokenizer = load_tokenizer(out_dir)
    tokenizer.save(out_dir)
    return load_tokenizer(out_dir)


def tiny_internvl_config(image_token_id: int, *, tie_word_embeddings: bool = False,
                         **overrides) -> InternVLConfig:
    """The tiny InternVL config (fp32, eager attention) with the image token `image_token_id`."""
    values = dict(
        vision_config=dict(VISION, attention_bias=True, layer_scale_init_value=0.1),
        text_config=dict(TEXT, model_type="qwen2", tie_word_embeddings=tie_word_embeddings),
        image_token_id=image_token_id, image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5,
        tie_word_embeddings=tie_word_embeddings, attn_implementation="eager", dtype="float32")
    values.update(overrides)
    return InternVLConfig(**values)


def save_tiny_internvl(out_dir: str, *, seed: int = 0, tie_word_embeddings: bool = False
                       ) -> InternVLForConditionalGeneration:
    """Save a tiny random InternVL (weights, config, tokenizer) to `out_dir`; return the model
    (fp32, eval mode) with exactly the weights written."""
    tokenizer = save_tiny_tokenizer(out_dir, with_long_vita_tokens=True)
    torch.manual_seed(seed)
    config = tiny_internvl_config(tokenizer.img_context_id,
                                  tie_word_embeddings=tie_word_embeddings)
    model = InternVLForConditionalGeneration(config).float().eval()
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    return model


def save_tiny_qwen2(out_dir: str, *, seed: int = 0, **text_overrides) -> Qwen2ForCausalLM:
    """Save a tiny random Qwen2 causal LM and the plain tiny tokenizer (no Long-VITA tokens)
    to `out_dir`; return the model (fp32, eval mode, eager attention). `text_overrides`
    change `TEXT` fields (e.g. `vocab_size`)."""
    save_tiny_tokenizer(out_dir, with_long_vita_tokens=False)
    torch.manual_seed(seed)
    config = Qwen2Config(**dict(TEXT, **text_overrides), tie_word_embeddings=False,
                         attn_implementation="eager", dtype="float32")
    model = Qwen2ForCausalLM(config).float().eval()
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    return model


def tiny_internvit_state_dict(seed: int = 0, vision: Optional[dict] = None
                              ) -> Dict[str, torch.Tensor]:
    """Random InternViT weights in the original naming (fused qkv with bias, ls1/ls2,
    norm1/norm2), shaped by `vision` (default `VISION`)."""
    vision = VISION if vision is None else vision
    width, mlp = vision["hidden_size"], vision["intermediate_size"]
    patch = vision["patch_size"]
    positions = (vision["image_size"] // patch) ** 2 + 1
    shapes = {
        "embeddings.class_embedding": (1, 1, width),
        "embeddings.position_embedding": (1, positions, width),
        "embeddings.patch_embedding.weight": (width, 3, patch, patch),
        "embeddings.patch_embedding.bias": (width,),
    }
    for i in range(vision["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        shapes.update({
            p + "attn.qkv.weight": (3 * width, width), p + "attn.qkv.bias": (3 * width,),
            p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
            p + "ls1": (width,), p + "ls2": (width,),
            p + "norm1.weight": (width,), p + "norm1.bias": (width,),
            p + "norm2.weight": (width,), p + "norm2.bias": (width,),
            p + "mlp.fc1.weight": (mlp, width), p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (width, mlp), p + "mlp.fc2.bias": (width,),
        })
    gen = torch.Generator().manual_seed(seed)
    return {name: random_weight(name, shape, gen) for name, shape in shapes.items()}


def internvit_config_json() -> dict:
    """config.json of the tiny InternViT in the original InternVisionModel format."""
    return {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": VISION["hidden_size"], "num_hidden_layers": VISION["num_hidden_layers"],
        "num_attention_heads": VISION["num_attention_heads"],
        "intermediate_size": VISION["intermediate_size"], "image_size": VISION["image_size"],
        "patch_size": VISION["patch_size"], "layer_norm_eps": VISION["layer_norm_eps"],
        "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
        "hidden_act": "gelu", "initializer_factor": 0.1, "num_channels": 3,
        "drop_path_rate": 0.0, "dropout": 0.0, "attention_dropout": 0.0,
        "use_flash_attn": False, "torch_dtype": "float32",
    }


def save_tiny_internvit(out_dir: str, *, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Write a tiny InternViT directory (model.safetensors + config.json, original naming);
    return the state dict written."""
    os.makedirs(out_dir, exist_ok=True)
    state = tiny_internvit_state_dict(seed)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(internvit_config_json(), f, indent=2)
    return state


def image_prompt_ids(tokenizer: VitaTokenizer, n_tiles: int, *, text_before: str = "Look: ",
                     text_after: str = " What is in the picture?") -> torch.Tensor:
    """Token ids `[1, s]` of text around one `<img>` span holding `n_tiles * TOKENS_PER_TILE`
    `<IMG_CONTEXT>` tokens (what InternVL feeds for `n_tiles` tiles)."""
    ids = (tokenizer.encode(text_before) + [tokenizer.img_start_id]
           + [tokenizer.img_context_id] * (n_tiles * TOKENS_PER_TILE)
           + [tokenizer.img_end_id] + tokenizer.encode(text_after))
    return torch.tensor([ids], dtype=torch.long)


def tiny_model_config(*, projector: str = "internvl", **language_overrides) -> ModelConfig:
    """The native `ModelConfig` of the tiny models above (fp32), with `language` fields
    overridden by `language_overrides` (e.g. `hidden_size=32`)."""
    language = dict(hidden_size=TEXT["hidden_size"], num_layers=TEXT["num_hidden_layers"],
                    num_attention_heads=TEXT["num_attention_heads"],
                    num_query_groups=TEXT["num_key_value_heads"],
                    ffn_hidden_size=TEXT["intermediate_size"], vocab_size=TEXT["vocab_size"],
                    rms_norm_eps=TEXT["rms_norm_eps"], rotary_base=TEXT["rope_theta"],
                    max_position_embeddings=TEXT["max_position_embeddings"])
    language.update(language_overrides)
    return ModelConfig(
        vision=VisionConfig(image_size=VISION["image_size"], patch_size=VISION["patch_size"],
                            hidden_size=VISION["hidden_size"],
                            num_layers=VISION["num_hidden_layers"],
                            num_heads=VISION["num_attention_heads"],
                            intermediate_size=VISION["intermediate_size"]),
        projector=ProjectorConfig(variant=projector), language=LanguageConfig(**language),
        params_dtype="float32")
