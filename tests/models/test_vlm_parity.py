"""The composed LongVitaModel (TP=1, one process, fp32) against transformers:
`InternVLForConditionalGeneration` text-only and with several image tiles, loaded from the HF
directory and from the native checkpoint `convert import-hf` writes; `Qwen2ForCausalLM` through
the Qwen2 + InternViT import. Max abs logit difference <= 1e-4 (measured ~1e-5)."""

import pytest
import torch

from backends import get_backend
from mindspeed_vita.convert.checkpoint import load_full_state_into_model, write_checkpoint
from mindspeed_vita.convert.hf_internvl import import_internvl
from mindspeed_vita.convert.hf_split import import_split
from mindspeed_vita.data.tokenizer import LONG_VITA_SPECIAL_TOKENS
from mindspeed_vita.models.build import build_model, load_pretrained
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel
from tests.tiny_hf import (
    IMAGE_SIZE, TOKENS_PER_TILE, save_tiny_internvit, save_tiny_internvl, save_tiny_qwen2)

TOL = 1e-4


@pytest.fixture(scope="module")
def groups():
    yield initialize_parallel(get_backend("cpu"), ParallelLayout())
    destroy_parallel()


@pytest.fixture(scope="module")
def backend(groups):
    return get_backend("cpu")


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """(HF directory, the transformers model, native checkpoint directory at tp=1)."""
    root = tmp_path_factory.mktemp("internvl")
    hf_dir, native_dir = str(root / "hf"), str(root / "native")
    model = save_tiny_internvl(hf_dir, seed=11)
    write_checkpoint(import_internvl(hf_dir), native_dir, tp_size=1)
    return hf_dir, model, native_dir


def text_batch(tokenizer):
    rows = ["Describe the image in detail, please.", "The dog is sleeping under a tree!!"]
    ids = [tokenizer.encode(r) for r in rows]
    n = min(len(i) for i in ids)
    ids = torch.tensor([i[:n] for i in ids])
    return ids, torch.arange(n).repeat(2, 1)


def image_batch(tokenizer):
    """Two rows of equal length: two images (2 tiles + 1 tile) in row 0, one tile in row 1."""
    ctx = [tokenizer.img_context_id] * TOKENS_PER_TILE

    def image(n_tiles):
        return [tokenizer.img_start_id] + ctx * n_tiles + [tokenizer.img_end_id]

    tail = tokenizer.encode(" What is in the picture? Answer in detail, please.")
    row0 = tokenizer.encode("Compare") + image(2) + image(1)
    row1 = tokenizer.encode("Look at this picture") + image(1)
    n = max(len(row0), len(row1)) + 3
    ids = torch.tensor([(row0 + tail)[:n], (row1 + tail)[:n]])
    assert int((ids == tokenizer.img_context_id).sum()) == 4 * TOKENS_PER_TILE
    pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    return ids, torch.arange(n).repeat(2, 1), pixels


def max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_internvl_text_and_images_match_transformers(backend, internvl, groups):
    hf_dir, hf, _ = internvl
    model, tokenizer, cfg = load_pretrained(hf_dir, backend, groups=groups)
    model.eval()
    assert cfg.projector.variant == "internvl" and cfg.image_layout == "internvl"
    ids, positions = text_batch(tokenizer)
    assert max_diff(model.logits(ids, positions), hf(input_ids=ids).logits) <= TOL
    ids, positions, pixels = image_batch(tokenizer)
    ours = model.logits(ids, positions, pixels)
    ref = hf(input_ids=ids, pixel_values=pixels).logits
    assert max_diff(ours, ref) <= TOL
    # the images do matter: without them (context tokens as plain text) the logits differ
    text_only = hf(input_ids=ids).logits
    assert max_diff(text_only, ref) > 1e-2


@torch.no_grad()
def test_native_checkpoint_gives_the_same_logits(backend, internvl, groups):
    hf_dir, hf, native_dir = internvl
    from_hf, tokenizer, _ = load_pretrained(hf_dir, backend, groups=groups)
    from_native, native_tokenizer, cfg = load_pretrained(native_dir, backend, groups=groups)
    assert len(native_tokenizer) == len(tokenizer)
    ids, positions, pixels = image_batch(tokenizer)
    expected = from_hf.eval().logits(ids, positions, pixels)
    got = from_native.eval().logits(ids, positions, pixels)
    assert torch.equal(got, expected)  # same weights, same tp: bit-identical


@torch.no_grad()
def test_qwen2_through_split_import_matches_transformers(backend, tmp_path, groups):
    qwen2_dir, vit_dir = str(tmp_path / "qwen2"), str(tmp_path / "vit")
    hf = save_tiny_qwen2(qwen2_dir, seed=12)
    save_tiny_internvit(vit_dir, seed=13)
    native = import_split(qwen2_dir, vit_dir, projector_variant="long-vita")
    model = build_model(native.cfg, backend, groups=groups, tokenizer=native.tokenizer).eval()
    load_full_state_into_model(model, native.state, native.cfg, "split import")
    ids, positions = text_batch(native.tokenizer)
    # positions need not start at 0 or be contiguous: RoPE follows them, as in Qwen2
    positions = positions * 2 + 3
    ours = model.logits(ids, positions)
    ref = hf(input_ids=ids, position_ids=positions).logits
    # the Long-VITA tokens' rows were re-initialised (mean row); every other column must agree
    added = [native.tokenizer.token_to_id(t) for t in LONG_VITA_SPECIAL_TOKENS]
    keep = torch.ones(ref.shape[-1], dtype=torch.bool)
    keep[added] = False
    assert max_diff(ours[..., keep], ref[..., keep]) <= TOL
