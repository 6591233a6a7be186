"""Greedy generation through `mindspeed-vita infer` equals transformers' `generate`.

A tiny random `InternVLForConditionalGeneration` is saved by transformers, then run two ways:

* ours: `mindspeed-vita infer --json --greedy` on the HF directory itself and on the native
  checkpoint `convert import-hf` writes from it (render, prefill, KV-cache decode);
* transformers: `generate(do_sample=False)` on inputs built the way HF's InternVL processor
  builds them, independently of our renderer: pixel values from `GotOcr2ImageProcessor` (the
  InternVL image processor: dynamic tiles, thumbnail last, ImageNet mean/std) and the prompt
  text with each image expanded to `<img>` + image_seq_length x tiles `<IMG_CONTEXT>` + `</img>`
  (`InternVLProcessor.replace_image_token`), tokenized by the directory's tokenizer.

Our rendered ids and pixels must equal those inputs exactly; the generated ids must be identical
for every new token (>= 16, varied, not a constant run) and the log-probabilities within 1e-4.
The image case uses a photo (skimage's coffee, 600 x 400 -> a 3 x 2 grid + thumbnail = 7 tiles).
Finally the directory `convert export-hf` writes carries a generation_config.json, so plain
`generate()` on it (no eos argument) stops exactly where `mindspeed-vita infer` stops.
"""
import json
import os

import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GenerationConfig, GotOcr2ImageProcessor
from transformers import InternVLForConditionalGeneration

from mindspeed_vita.cli import main
from mindspeed_vita.convert.checkpoint import TOKENIZER_DIR, read_metadata
from mindspeed_vita.data.render import render_sample
from mindspeed_vita.data.tokenizer import load_tokenizer
from mindspeed_vita.inference.engine import build_request
from tests.tiny_hf import IMAGE_SIZE, TOKENS_PER_TILE, save_tiny_internvl

NEW_TOKENS = 20
LOGPROB_TOL = 1e-4
QUESTION = "What is in the picture? Describe it."
STORY = "Tell me a story about a dog."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    paths = {name: str(root / name) for name in ("hf", "native")}
    model = save_tiny_internvl(paths["hf"], seed=0)
    assert main(["convert", "import-hf", paths["hf"], paths["native"]]) == 0
    paths["image"] = str(root / "coffee.png")
    Image.fromarray(skimage.data.coffee()).save(paths["image"])
    paths["root"] = str(root)
    return paths, model


def hf_inputs(hf_dir: str, question: str, image_path=None):
    """`(input_ids [1, s], pixel_values or None)` as HF's InternVL processor builds them."""
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    content, pixels = question, None
    if image_path is not None:
        processor = GotOcr2ImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True,
            min_patches=1, max_patches=12, image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225])
        out = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
        pixels, tiles = out["pixel_values"], int(out["num_patches"][0])
        content = ("<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>\n"
                   + question)
    text = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids, pixels


def hf_generate(model, ids, pixels, **kwargs):
    """Greedy `generate`: `(new token ids, log-probability of each under the raw logits)`."""
    extra = {} if pixels is None else {"pixel_values": pixels}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **extra,
                             max_new_tokens=NEW_TOKENS, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    new = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[token])
                for step, token in zip(out.logits, new)]
    return new, logprobs


def infer_json(capsys, checkpoint, prompt, images=()):
    capsys.readouterr()
    argv = ["infer", "--checkpoint", checkpoint, "--prompt", prompt, "--greedy", "--json",
            "--max-new-tokens", str(NEW_TOKENS)]
    for path in images:
        argv += ["--image", path]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def stop_ids(native_dir):
    return sorted(load_tokenizer(os.path.join(native_dir, TOKENIZER_DIR)).stop_token_ids)


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_our_rendering_is_what_hf_internvl_feeds(dirs, with_image):
    paths, _ = dirs
    question = QUESTION if with_image else STORY
    image = paths["image"] if with_image else None
    ids, pixels = hf_inputs(paths["hf"], question, image)
    meta = read_metadata(paths["native"])
    tokenizer = load_tokenizer(os.path.join(paths["native"], TOKENIZER_DIR))
    assert meta.model_config.image_layout == "internvl"
    rendered = render_sample(build_request(question, [image] if image else []), tokenizer,
                             model_cfg=meta.model_config, max_num_frame=8,
                             add_generation_prompt=True)
    assert torch.equal(rendered.input_ids, ids[0])
    if with_image:
        assert pixels.shape == (7, 3, IMAGE_SIZE, IMAGE_SIZE)  # 3 x 2 tiles + thumbnail
        assert torch.equal(rendered.pixel_values, pixels)
    else:
        assert rendered.pixel_values.shape[0] == 0


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("source", ["hf", "native"])
def test_greedy_tokens_match_transformers(dirs, capsys, with_image, source):
    paths, hf = dirs
    question = QUESTION if with_image else STORY
    images = [paths["image"]] if with_image else []
    ids, pixels = hf_inputs(paths["hf"], question, images[0] if images else None)
    stops = stop_ids(paths["native"])
    expected, expected_logprobs = hf_generate(hf, ids, pixels, do_sample=False,
                                              eos_token_id=stops, pad_token_id=stops[0])
    # the comparison means something only if the model says something varied
    assert len(expected) == NEW_TOKENS and not set(expected) & set(stops)
    assert len(set(expected)) >= 8

    ours = infer_json(capsys, paths[source], question, images)
    assert ours["prompt_tokens"] == ids.shape[1]
    assert ours["token_ids"] == expected
    assert ours["stop_reason"] == "length"
    diffs = [abs(a - b) for a, b in zip(ours["logprobs"], expected_logprobs)]
    assert max(diffs) <= LOGPROB_TOL
    print(f"{source}/{'image' if with_image else 'text'}: {NEW_TOKENS} tokens identical, "
          f"max |logprob diff| {max(diffs):.2e}")


def test_the_image_changes_the_generation(dirs):
    # a control: with other pixels the same prompt scores differently, so the parity above
    # exercises the vision path and not just the text
    paths, hf = dirs
    ids, pixels = hf_inputs(paths["hf"], QUESTION, paths["image"])
    stops = stop_ids(paths["native"])
    kwargs = dict(do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    tokens, logprobs = hf_generate(hf, ids, pixels, **kwargs)
    other_tokens, other_logprobs = hf_generate(hf, ids, pixels.flip(-1).flip(-2), **kwargs)
    assert tokens != other_tokens or max(
        abs(a - b) for a, b in zip(logprobs, other_logprobs)) > 1e-2


def _make_im_end_likely(hf_dir: str, token: int, im_end: int) -> None:
    """Give `<|im_end|>` the output row of `token`, scaled up: wherever greedy decoding would
    pick `token` (with a positive logit), it now picks `<|im_end|>` and stops."""
    file = os.path.join(hf_dir, "model.safetensors")
    state = load_file(file)
    head = state["language_model.lm_head.weight"].clone()
    head[im_end] = 1.5 * head[token]
    state["language_model.lm_head.weight"] = head
    save_file(state, file, metadata={"format": "pt"})


def test_exported_directory_generates_like_mindspeed_vita(dirs, capsys):
    paths, hf = dirs
    root = paths["root"]
    stops = stop_ids(paths["native"])
    ids, pixels = hf_inputs(paths["hf"], QUESTION, paths["image"])
    free_run, _ = hf_generate(hf, ids, pixels, do_sample=False, eos_token_id=stops,
                              pad_token_id=stops[0])
    im_end = load_tokenizer(paths["hf"]).im_end_id
    # a source that ends its answer: <|im_end|> takes over the 6th token's output row
    source, native, exported = (os.path.join(root, n) for n in ("ends", "ends_native",
                                                                "ends_hf"))
    save_tiny_internvl(source, seed=0)
    _make_im_end_likely(source, free_run[5], im_end)
    assert main(["convert", "import-hf", source, native]) == 0
    assert main(["convert", "export-hf", native, exported]) == 0

    generation = GenerationConfig.from_pretrained(exported)
    assert sorted(generation.eos_token_id) == stops
    assert generation.pad_token_id == load_tokenizer(exported).pad_id
    assert not generation.do_sample

    ours = infer_json(capsys, native, QUESTION, [paths["image"]])
    assert ours["stop_reason"] == "stop_token" and ours["token_ids"][-1] == im_end
    assert 2 <= len(ours["token_ids"]) <= 6
    # transformers, with nothing but the exported directory's own generation settings
    model = InternVLForConditionalGeneration.from_pretrained(exported).eval()
    theirs, theirs_logprobs = hf_generate(model, ids, pixels)
    assert theirs == ours["token_ids"]
    assert max(abs(a - b) for a, b in zip(ours["logprobs"], theirs_logprobs)) <= LOGPROB_TOL


def _infer_cp(rank, world, argv):
    """`mindspeed-vita infer ... --cp world` in this rank (torchrun's environment is set)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv + ["--cp", str(world)]) == 0
    return out.getvalue()


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_greedy_tokens_match_transformers_at_cp2(dirs, with_image):
    # the same parity with the prompt zigzag-sharded over two gloo processes: ring-attention
    # prefill, a KV cache sharded over the CP ranks, every decode step merged by lse
    from tests.dist_utils import run_distributed

    paths, hf = dirs
    question = QUESTION if with_image else STORY
    ids, pixels = hf_inputs(paths["hf"], question, paths["image"] if with_image else None)
    stops = stop_ids(paths["native"])
    expected, expected_logprobs = hf_generate(hf, ids, pixels, do_sample=False,
                                              eos_token_id=stops, pad_token_id=stops[0])
    argv = ["infer", "--checkpoint", paths["native"], "--prompt", question, "--greedy",
            "--json", "--max-new-tokens", str(NEW_TOKENS), "--backend", "cpu"]
    if with_image:
        argv += ["--image", paths["image"]]
    outs = run_distributed(_infer_cp, 2, args=(argv,), init_process_group=False, timeout=600)
    assert outs[1] == ""  # only rank 0 prints
    ours = json.loads(outs[0])
    assert ours["prompt_tokens"] == ids.shape[1] and ours["token_ids"] == expected
    assert max(abs(a - b) for a, b in zip(ours["logprobs"], expected_logprobs)) <= LOGPROB_TOL
