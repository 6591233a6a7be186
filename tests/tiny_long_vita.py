"""A tiny checkpoint in the Long-VITA release's `_HF` layout, built from the release's names.

Written the way the authors' `Long-VITA-*_HF` directories are (issue 11 lists the names):
config.json with `model_type: "long_vita"`, the Qwen2 fields at top level and the InternViT
config nested under `"visual"`; weights `model.vision_model.*` (original InternViT naming),
`model.vision_projection.{pre_proj_layernorm.*, mlp.0.weight, mlp.2.weight}`, Qwen2 `model.*`
and `lm_head.weight`; the tiny Qwen2-like tokenizer with the 17 tokens added by transformers'
own `add_tokens` in the release's order; the release's generation_config.json.

Nothing here goes through mindspeed-vita's converters, so importing it tests them. The vision
width equals the LLM width (64): then the bias-free Long-VITA projector has the shapes of HF
InternVL's projector and `InternVLForConditionalGeneration` can serve as the reference (with
zero projector biases), see `internvl_reference`.
"""
from __future__ import annotations

import json
import os
from typing import Dict

import torch
from safetensors.torch import save_file
from PIL import Image
from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLConfig
from transformers import InternVLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer
from tests.tiny_hf import random_weight, randomize_, tiny_internvit_state_dict

#: the release's added tokens, in its order (long_vita/tokenizer.py `update_tokenizer`)
RELEASE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<vid>", "</vid>", "<VID_CONTEXT>",
                  "<patch>", "</patch>", "<PATCH_CONTEXT>", "<quad>", "</quad>", "<ref>",
                  "</ref>", "<box>", "</box>", "<image>", "<video>"]
WIDTH = 64
VISUAL = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, image_size=56, patch_size=14, layer_norm_eps=1e-6)
TEXT = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, vocab_size=1000, rms_norm_eps=1e-6,
            rope_theta=1000000.0, max_position_embeddings=4096)
TOKENS_PER_TILE = 4  # (56 / 14 * 0.5) ** 2
IMAGE_SIZE = VISUAL["image_size"]


def release_config() -> dict:
    """config.json with the release's keys (config_14B.json), tiny sizes, float32."""
    visual = {"architectures": ["InternVisionModel"], "attention_dropout": 0.0,
              "drop_path_rate": 0.0, "dropout": 0.0, "hidden_act": "gelu",
              "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "intern_vit_6b",
              "norm_type": "layer_norm", "num_channels": 3, "qk_normalization": False,
              "qkv_bias": True, "torch_dtype": "float32", "use_flash_attn": False, **VISUAL}
    return {"visual": visual, "architectures": ["LongVITAForCausalLM"],
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
            "hidden_act": "silu", "initializer_range": 0.02, "max_window_layers": 70,
            "model_type": "long_vita", "sliding_window": 4096, "tie_word_embeddings": False,
            "torch_dtype": "float32", "use_cache": True, "use_sliding_window": False, **TEXT}


RELEASE_GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                             "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                             "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def vision_state(seed: int) -> Dict[str, torch.Tensor]:
    """Random InternViT weights under `model.vision_model.` (original naming), shaped by
    `VISUAL`."""
    return {"model.vision_model." + k: v
            for k, v in tiny_internvit_state_dict(seed, VISUAL).items()}


def projector_state(seed: int) -> Dict[str, torch.Tensor]:
    """Random Long-VITA projector weights: LayerNorm(4w), Linear(4w -> w), Linear(w -> llm)."""
    shuffled = 4 * WIDTH
    shapes = {"pre_proj_layernorm.weight": (shuffled,), "pre_proj_layernorm.bias": (shuffled,),
              "mlp.0.weight": (WIDTH, shuffled), "mlp.2.weight": (TEXT["hidden_size"], WIDTH)}
    gen = torch.Generator().manual_seed(seed + 1)
    return {"model.vision_projection." + k: random_weight(k, s, gen) for k, s in shapes.items()}


def save_release_tokenizer(out_dir: str) -> None:
    """The tiny Qwen2-like tokenizer plus the 17 tokens, added as the release adds them."""
    build_tiny_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.add_tokens(RELEASE_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(out_dir)


def save_tiny_long_vita(out_dir: str, *, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Write the tiny release-layout checkpoint to `out_dir`; return its tensors."""
    os.makedirs(out_dir, exist_ok=True)
    save_release_tokenizer(out_dir)
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(Qwen2Config(**TEXT, tie_word_embeddings=False)).float()
    randomize_(llm, seed)
    state = {k: v.detach().clone().contiguous() for k, v in llm.state_dict().items()}
    state.update(vision_state(seed))
    state.update(projector_state(seed))
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name, content in (("config.json", release_config()),
                          ("generation_config.json", RELEASE_GENERATION_CONFIG)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    return state


def _internvit_to_hf_internvl(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Original InternViT names -> transformers' InternVL vision-tower names (written out here,
    not taken from mindspeed-vita's mapping, so the reference stays independent)."""
    out = {}
    renames = {"ls1": "lambda_1", "ls2": "lambda_2", "norm1": "layernorm_before",
               "norm2": "layernorm_after", "attn.proj": "attention.projection_layer",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    patch = "embeddings.patch_embeddings.projection."
    embeddings = {"embeddings.class_embedding": "embeddings.cls_token",
                  "embeddings.position_embedding": "embeddings.position_embeddings",
                  "embeddings.patch_embedding.weight": patch + "weight",
                  "embeddings.patch_embedding.bias": patch + "bias"}
    for key, tensor in state.items():
        name = key[len("model.vision_model."):]
        if name in embeddings:
            out["model.vision_tower." + embeddings[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)
        prefix = f"model.vision_tower.encoder.layer.{index}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"{prefix}attention.{part}_proj.{kind}"] = chunk
            continue
        module, _, param = rest.rpartition(".") if "." in rest else ("", "", rest)
        out[prefix + (renames[module] + "." + param if module else renames[param])] = tensor
    return out


def internvl_reference(state: Dict[str, torch.Tensor], image_token_id: int
                       ) -> InternVLForConditionalGeneration:
    """transformers' InternVL with the tiny checkpoint's weights: vision tower renamed, the
    Long-VITA projector as `multi_modal_projector` with zero biases (same shapes because the
    vision width equals the LLM width), the Qwen2 weights as the language model."""
    config = InternVLConfig(
        vision_config=dict(VISUAL, attention_bias=True, layer_scale_init_value=1.0),
        text_config=dict(TEXT, model_type="qwen2", tie_word_embeddings=False),
        image_token_id=image_token_id, image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5,
        tie_word_embeddings=False, attn_implementation="eager", dtype="float32")
    model = InternVLForConditionalGeneration(config).float().eval()
    mapped = _internvit_to_hf_internvl({k: v for k, v in state.items()
                                        if k.startswith("model.vision_model.")})
    p = "model.vision_projection."
    projector = {"layer_norm.weight": state[p + "pre_proj_layernorm.weight"],
                 "layer_norm.bias": state[p + "pre_proj_layernorm.bias"],
                 "linear_1.weight": state[p + "mlp.0.weight"],
                 "linear_1.bias": torch.zeros(WIDTH),
                 "linear_2.weight": state[p + "mlp.2.weight"],
                 "linear_2.bias": torch.zeros(TEXT["hidden_size"])}
    mapped.update({"model.multi_modal_projector." + k: v for k, v in projector.items()})
    for key, tensor in state.items():
        if key == "lm_head.weight":
            mapped[key] = tensor
        elif key.startswith("model.") and not key.startswith(("model.vision_model.", p)):
            mapped["model.language_model." + key[len("model."):]] = tensor
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary" not in k], missing
    return model


def release_inputs(hf_dir: str, question: str, image_path: str, grid):
    """`(ids [1, s], pixel_values, token ids by name)` of a one-image question, built as the
    release builds them, from transformers only: ChatML with the role header as its own
    piece, `<image>` replaced by the thumbnail span then, per tile row, "\\n" and the row's
    patch spans; pixels from transformers' InternVL image processor with the thumbnail moved
    first (the release's order). `grid` = (cols, rows) is checked against the processor."""
    tok = AutoTokenizer.from_pretrained(hf_dir)

    def enc(text):
        return tok(text, add_special_tokens=False).input_ids

    ids = {t: tok.convert_tokens_to_ids(t) for t in RELEASE_TOKENS + ["<|im_start|>",
                                                                      "<|im_end|>"]}
    nl = enc("\n")
    tokens = ([ids["<|im_start|>"]] + enc("user") + nl + enc("<image>\n" + question)
              + [ids["<|im_end|>"]] + nl + [ids["<|im_start|>"]] + enc("assistant") + nl)
    processor = GotOcr2ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True, min_patches=1,
        max_patches=12, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    out = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    pixels = out["pixel_values"]
    cols, rows = grid
    assert int(out["num_patches"][0]) == cols * rows + (1 if cols * rows > 1 else 0)
    span = [ids["<img>"]] + [ids["<IMG_CONTEXT>"]] * TOKENS_PER_TILE + [ids["</img>"]]
    if cols * rows > 1:
        for _ in range(rows):
            span += nl
            for _ in range(cols):
                span += ([ids["<patch>"]] + [ids["<PATCH_CONTEXT>"]] * TOKENS_PER_TILE
                         + [ids["</patch>"]])
        # the release puts the thumbnail first; transformers' processor puts it last
        pixels = torch.cat((pixels[-1:], pixels[:-1]))
    at = tokens.index(ids["<image>"])
    return torch.tensor([tokens[:at] + span + tokens[at + 1:]]), pixels, ids


def reference_generate(model, ids, pixels, token_ids, stops, max_new_tokens):
    """Greedy generation of the transformers reference (`internvl_reference`): `(new ids,
    log-probability of each)`. InternVL fills the rows of its one image token; the release's
    patch-context rows receive the tile features in the same order, so both become that
    token here. Visual tokens are suppressed, as mindspeed-vita's generation never emits
    them (with this random model they would otherwise be chosen now and then)."""
    hf_ids = ids.clone()
    hf_ids[hf_ids == token_ids["<PATCH_CONTEXT>"]] = token_ids["<IMG_CONTEXT>"]
    banned = [token_ids[t] for t in RELEASE_TOKENS[:9] + ["<image>", "<video>"]]
    with torch.no_grad():
        out = model.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                             pixel_values=pixels, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=stops[0],
                             suppress_tokens=banned, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t])
                for step, t in zip(out.logits, new)]
    return new, logprobs
