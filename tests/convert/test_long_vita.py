"""The Long-VITA release's `_HF` checkpoints: import, generation parity, bit-exact export.

A tiny checkpoint is written in the release's layout from the release's names
(`tests/tiny_long_vita.py`), then:

* `convert import-hf` detects it (model_type long_vita) and `infer` runs on it directly;
* greedy generation on a real photo (skimage's coffee, 600 x 400 -> 3 x 2 tiles + thumbnail)
  equals transformers' `InternVLForConditionalGeneration` run on the same weights, with the
  prompt built as the release builds it (role header as its own piece, `<image>` replaced by
  the thumbnail span then one "\\n" + patch spans per tile row) and pixels from transformers'
  InternVL image processor reordered thumbnail first, as the release orders them;
* `convert export-hf --layout long-vita` gives back every tensor bit for bit, the same
  config.json, generation_config.json and tokenizer;
* shapes that disagree with config.json are refused naming the tensor and the key.
"""
import json
import os

import pytest
import skimage.data
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from mindspeed_vita.cli import main
from mindspeed_vita.convert.checkpoint import TOKENIZER_DIR, read_metadata
from mindspeed_vita.config.model import ModelConfig
from mindspeed_vita.convert.long_vita import (import_long_vita, long_vita_config_json,
                                              model_config_from_long_vita)
from mindspeed_vita.data.render import render_sample
from mindspeed_vita.data.tokenizer import load_tokenizer
from mindspeed_vita.errors import CheckpointError
from mindspeed_vita.inference.engine import build_request
from tests.tiny_long_vita import (RELEASE_GENERATION_CONFIG, RELEASE_TOKENS,
                                  internvl_reference, release_config, save_tiny_long_vita)
from tests.tiny_long_vita import release_inputs as tiny_release_inputs
from tests.tiny_long_vita import reference_generate as tiny_reference_generate

NEW_TOKENS = 20
MODEL_14B = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "model", "long_vita_14b.yaml")
LOGPROB_TOL = 1e-4
QUESTION = "What is in the picture? Describe it."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_vita")
    paths = {name: str(root / name) for name in ("hf", "native", "export")}
    state = save_tiny_long_vita(paths["hf"], seed=0)
    assert main(["convert", "import-hf", paths["hf"], paths["native"]]) == 0
    paths["image"] = str(root / "coffee.png")
    Image.fromarray(skimage.data.coffee()).save(paths["image"])
    return paths, state


COFFEE_GRID = (3, 2)  # 600 x 400 -> 3 columns x 2 rows (+ thumbnail)


def release_inputs(hf_dir, question, image_path):
    return tiny_release_inputs(hf_dir, question, image_path, COFFEE_GRID)


def reference_generate(state, ids, pixels, token_ids, stops):
    model = internvl_reference(state, token_ids["<IMG_CONTEXT>"])
    return tiny_reference_generate(model, ids, pixels, token_ids, stops, NEW_TOKENS)


def test_import_detects_the_release_layout(dirs):
    paths, _ = dirs
    meta = read_metadata(paths["native"])
    cfg = meta.model_config
    assert cfg.projector.variant == "long-vita" and cfg.image_layout == "long-vita"
    assert (cfg.min_tiles, cfg.max_tiles, cfg.projector.downsample_ratio) == (1, 12, 0.5)
    assert cfg.vision.hidden_size == 64 and cfg.language.vocab_size == 1000
    assert cfg.language.rotary_base == 1e6 and not cfg.language.tie_word_embeddings
    tokenizer = load_tokenizer(os.path.join(paths["native"], TOKENIZER_DIR))
    source = AutoTokenizer.from_pretrained(paths["hf"])
    # the checkpoint's own tokenizer: nothing added, every id as in the directory
    assert len(tokenizer) == len(source)
    assert [tokenizer.token_to_id(t) for t in RELEASE_TOKENS] == [
        source.convert_tokens_to_ids(t) for t in RELEASE_TOKENS]


def test_rendering_is_what_the_release_feeds(dirs):
    paths, _ = dirs
    ids, pixels, _ = release_inputs(paths["hf"], QUESTION, paths["image"])
    meta = read_metadata(paths["native"])
    tokenizer = load_tokenizer(os.path.join(paths["native"], TOKENIZER_DIR))
    rendered = render_sample(build_request(QUESTION, [paths["image"]]), tokenizer,
                             model_cfg=meta.model_config, max_num_frame=8,
                             add_generation_prompt=True)
    assert torch.equal(rendered.input_ids, ids[0])
    assert torch.equal(rendered.pixel_values, pixels)


@pytest.mark.parametrize("source", ["hf", "native"])
def test_greedy_generation_matches_transformers(dirs, capsys, source):
    paths, state = dirs
    ids, pixels, token_ids = release_inputs(paths["hf"], QUESTION, paths["image"])
    stops = sorted(load_tokenizer(paths["hf"]).stop_token_ids)
    expected, expected_logprobs = reference_generate(state, ids, pixels, token_ids, stops)
    assert len(expected) == NEW_TOKENS and len(set(expected)) >= 8
    capsys.readouterr()
    assert main(["infer", "--checkpoint", paths[source], "--prompt", QUESTION, "--image",
                 paths["image"], "--greedy", "--json", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["prompt_tokens"] == ids.shape[1]
    assert ours["token_ids"] == expected
    diff = max(abs(a - b) for a, b in zip(ours["logprobs"], expected_logprobs))
    assert diff <= LOGPROB_TOL
    print(f"{source}: {NEW_TOKENS} tokens identical, max |logprob diff| {diff:.2e}")


def test_the_image_matters_to_the_reference(dirs):
    # control: other pixels change the reference's output, so the parity covers the vision path
    paths, state = dirs
    ids, pixels, token_ids = release_inputs(paths["hf"], QUESTION, paths["image"])
    stops = sorted(load_tokenizer(paths["hf"]).stop_token_ids)
    a, la = reference_generate(state, ids, pixels, token_ids, stops)
    b, lb = reference_generate(state, ids, pixels.flip(-1), token_ids, stops)
    assert a != b or max(abs(x - y) for x, y in zip(la, lb)) > 1e-2


def test_export_to_the_release_layout_is_bit_exact(dirs):
    paths, state = dirs
    assert main(["convert", "export-hf", paths["native"], paths["export"],
                 "--layout", "long-vita"]) == 0
    exported = load_file(os.path.join(paths["export"], "model.safetensors"))
    assert sorted(exported) == sorted(state)
    for key, tensor in state.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config = json.load(open(os.path.join(paths["export"], "config.json")))
    assert config == release_config()
    generation = json.load(open(os.path.join(paths["export"], "generation_config.json")))
    tok = load_tokenizer(paths["hf"])
    endoftext = tok.endoftext_id
    expected = dict(RELEASE_GENERATION_CONFIG, eos_token_id=[tok.im_end_id, endoftext],
                    pad_token_id=endoftext)
    assert generation == expected
    a, b = AutoTokenizer.from_pretrained(paths["hf"]), AutoTokenizer.from_pretrained(
        paths["export"])
    assert a.get_vocab() == b.get_vocab()
    assert {i: t.content for i, t in a.added_tokens_decoder.items()} == {
        i: t.content for i, t in b.added_tokens_decoder.items()}
    # and the exported directory imports to the same native state
    again = import_long_vita(paths["export"])
    first = import_long_vita(paths["hf"])
    assert sorted(again.state) == sorted(first.state)
    assert all(torch.equal(again.state[k], first.state[k]) for k in first.state)


def test_release_generation_config_at_qwen25_ids():
    # the release's own file: eos [151645, 151643], pad 151643 -- the ids our tokens agree with
    assert RELEASE_GENERATION_CONFIG["eos_token_id"] == [151645, 151643]
    assert RELEASE_GENERATION_CONFIG["pad_token_id"] == 151643


def test_shape_disagreeing_with_config_is_refused(dirs, tmp_path):
    paths, state = dirs
    bad = str(tmp_path / "bad")
    save_tiny_long_vita(bad, seed=0)
    broken = dict(state)
    broken["model.vision_projection.mlp.0.weight"] = torch.zeros(32, 256)
    save_file(broken, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"projector\.fc1\.weight.*visual\.hidden_size"):
        import_long_vita(bad)
    broken = dict(state)
    broken["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(broken, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj.*intermediate_size=128.*config\.json"):
        import_long_vita(bad)


def test_the_released_14b_config_is_our_14b_model():
    # config.json of Long-VITA-*_HF as released (long_vita_qwen2_intern/config_14B.json)
    visual = {"architectures": ["InternVisionModel"], "attention_dropout": 0.0,
              "drop_path_rate": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1024,
              "image_size": 448, "initializer_factor": 1.0, "initializer_range": 0.02,
              "intermediate_size": 4096, "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b",
              "norm_type": "layer_norm", "num_attention_heads": 16, "num_channels": 3,
              "num_hidden_layers": 24, "patch_size": 14, "qk_normalization": False,
              "qkv_bias": True, "torch_dtype": "bfloat16", "use_flash_attn": True}
    release = {"visual": visual, "architectures": ["LongVITAForCausalLM"],
               "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
               "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
               "intermediate_size": 13824, "max_position_embeddings": 1310720,
               "max_window_layers": 70, "model_type": "long_vita", "num_attention_heads": 40,
               "num_hidden_layers": 48, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
               "rope_theta": 1000000.0, "sliding_window": 1310720, "tie_word_embeddings": False,
               "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
               "vocab_size": 152064}
    ours = ModelConfig.model_validate(yaml.safe_load(open(MODEL_14B)))
    imported = model_config_from_long_vita(release, "config.json")
    for part in ("vision", "projector", "language"):
        assert getattr(imported, part) == getattr(ours, part).model_copy(
            update={"layer_scale_init": 1.0} if part == "vision" else {}), part
    assert (imported.image_layout, imported.min_tiles, imported.max_tiles,
            imported.params_dtype) == ("long-vita", 1, 12, "bfloat16")
    # and it writes back as the release wrote it
    assert long_vita_config_json(imported, release) == release
