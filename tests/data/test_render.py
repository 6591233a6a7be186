"""Sample -> RenderedSample: media loading, unit order, limits, dry (grids-only) mode."""
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

import mindspeed_vita.data.render as render_module
from mindspeed_vita.config.model import ModelConfig, VisionConfig
from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.images import image_to_tiles_tensor, load_image, normalize
from mindspeed_vita.data.records import parse_line
from mindspeed_vita.data.render import render_sample
from mindspeed_vita.data.template import render_conversation
from mindspeed_vita.data.tokenizer import load_tokenizer
from mindspeed_vita.data.types import IGNORE_INDEX, Message, Sample
from mindspeed_vita.data.video import load_video_frames
from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

SIZE = 56  # tile side: 4x4 patches of 14 -> 2x2 after pixel shuffle -> 4 tokens per unit
MODEL = ModelConfig(vision=VisionConfig(image_size=SIZE, patch_size=14, hidden_size=32,
                                        num_layers=1, num_heads=2, intermediate_size=64),
                    max_tiles=4)
INTERNVL = MODEL.model_copy(update={"image_layout": "internvl"})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _noise_image(path, width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    frames = root / "clip_frames"
    frames.mkdir()
    for i in range(3):
        _noise_image(frames / f"f{i + 1}.png", 40, 30, seed=10 + i)
    clip = str(root / "clip.mp4")
    with av.open(clip, "w") as container:  # 6 frames at 2 fps -> 1 fps sampling keeps 3
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(
                np.full((32, 32, 3), 40 * i, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {
        "square": _noise_image(root / "square.png", 56, 56, seed=1),  # grid (1, 1)
        "wide": _noise_image(root / "wide.png", 200, 50, seed=2),  # grid (4, 1)
        "tall": _noise_image(root / "tall.png", 60, 120, seed=3),  # grid (1, 2)
        "frames": str(frames),
        "clip": clip,
    }


def _sample(messages, images=(), videos=(), line=7):
    return Sample(source="unit", line=line, messages=messages, images=list(images),
                  videos=list(videos), path="/data/unit.jsonl")


def _mixed_sample(media):
    return _sample(
        [Message("user", "<image> then <video> and <image>?"), Message("assistant", "Busy."),
         Message("user", "<video><image>"), Message("assistant", "More.")],
        images=[media["square"], media["wide"], media["tall"]],
        videos=[media["frames"], media["clip"]])


def _render(sample, tok, model=MODEL, **kwargs):
    kwargs.setdefault("max_num_frame", 8)
    return render_sample(sample, tok, model_cfg=model, **kwargs)


def test_units_follow_the_tags_across_images_and_videos(tok, media):
    sample = _mixed_sample(media)
    out = _render(sample, tok)
    assert out.image_grids == [(1, 1), (4, 1), (1, 2)]
    assert out.num_frames == [3, 3]

    def tiles(path):
        return image_to_tiles_tensor(load_image(path), min_tiles=1, max_tiles=4, tile_size=SIZE,
                                     layout="long-vita")[0]

    def frames(path):
        return load_video_frames(path, max_num_frame=8, frame_size=SIZE)

    # tag order: image, video, image | video, image
    reference = torch.cat([tiles(media["square"]), frames(media["frames"]), tiles(media["wide"]),
                           frames(media["clip"]), tiles(media["tall"])])
    assert out.pixel_values.shape == (1 + 3 + 5 + 3 + 3, 3, SIZE, SIZE)
    assert out.pixel_values.dtype == torch.float32
    assert torch.equal(out.pixel_values, reference)

    ids, labels = render_conversation(sample.messages, tok, image_grids=out.image_grids,
                                      video_frames=out.num_frames, tokens_per_tile=4)
    assert out.input_ids.tolist() == ids and out.labels.tolist() == labels
    assert out.input_ids.dtype == torch.int64 and out.labels.dtype == torch.int64
    n_context = sum(int((out.input_ids == i).sum()) for i in tok.context_token_ids)
    assert n_context == out.pixel_values.shape[0] * MODEL.tokens_per_tile
    learned = out.input_ids[out.labels != IGNORE_INDEX].tolist()
    nl = tok.encode("\n")
    assert learned == (tok.encode("Busy.") + [tok.im_end_id] + nl + tok.encode("More.")
                       + [tok.im_end_id] + nl)


def test_unit_order_with_marked_loaders(tok, monkeypatch):
    """Each fake unit carries (media number, unit number); the stack must follow tag order."""
    def fake_image(path):
        return path

    def fake_tiles(image, *, min_tiles, max_tiles, tile_size, layout):
        media_id, n_units = {"i0": (0, 1), "i1": (1, 3), "i2": (2, 1)}[image]
        grid = (2, 1) if n_units == 3 else (1, 1)
        return _marked(media_id, n_units, tile_size), grid

    def fake_frames(path, *, max_num_frame, frame_size):
        media_id, n_units = {"v0": (10, 2), "v1": (11, 1)}[path]
        return _marked(media_id, n_units, frame_size)

    monkeypatch.setattr(render_module, "load_image", fake_image)
    monkeypatch.setattr(render_module, "image_to_tiles_tensor", fake_tiles)
    monkeypatch.setattr(render_module, "load_video_frames", fake_frames)
    sample = _sample([Message("user", "<video><image>x<image>"), Message("assistant", "y"),
                      Message("user", "<video> <image>"), Message("assistant", "z")],
                     images=["i0", "i1", "i2"], videos=["v0", "v1"])
    out = _render(sample, tok)
    marks = [(int(u[0, 0, 0]), int(u[1, 0, 0])) for u in out.pixel_values]
    assert marks == [(10, 0), (10, 1), (0, 0), (1, 0), (1, 1), (1, 2), (11, 0), (2, 0)]


def _marked(media_id, n_units, size):
    units = torch.zeros(n_units, 3, size, size)
    units[:, 0] = media_id
    units[:, 1] = torch.arange(n_units, dtype=torch.float32).view(n_units, 1, 1)
    return units


@pytest.mark.parametrize("model,thumbnail_at", [(MODEL, 0), (INTERNVL, 4)])
def test_layout_decides_where_the_thumbnail_sits(tok, media, model, thumbnail_at):
    sample = _sample([Message("user", "<image>"), Message("assistant", "Wide.")],
                     images=[media["wide"]])
    out = _render(sample, tok, model=model)
    assert out.image_grids == [(4, 1)] and out.pixel_values.shape[0] == 5
    thumbnail = normalize(load_image(media["wide"]), SIZE)
    assert torch.equal(out.pixel_values[thumbnail_at], thumbnail)
    if model.image_layout == "internvl":
        assert tok.patch_context_id not in out.input_ids.tolist()
        assert int((out.input_ids == tok.img_context_id).sum()) == 5 * 4


def test_grids_only_gives_the_same_tokens_without_decoding(tok, media, monkeypatch):
    sample = _mixed_sample(media)
    full = _render(sample, tok)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("grids_only decoded media")

    for name in ("load_image", "image_to_tiles_tensor", "load_video_frames"):
        monkeypatch.setattr(render_module, name, must_not_decode)
    dry = _render(sample, tok, grids_only=True)
    assert torch.equal(dry.input_ids, full.input_ids)
    assert torch.equal(dry.labels, full.labels)
    assert dry.image_grids == full.image_grids and dry.num_frames == full.num_frames
    assert dry.pixel_values.shape == (0, 3, SIZE, SIZE)


def test_frame_cap_per_video(tok, media):
    sample = _sample([Message("user", "<video><video>"), Message("assistant", "ok")],
                     videos=[media["frames"], media["clip"]])
    for grids_only in (False, True):
        out = _render(sample, tok, max_num_frame=2, grids_only=grids_only)
        assert out.num_frames == [2, 2]


def test_over_limit(tok, media):
    images = _sample([Message("user", "<image><image>"), Message("assistant", "two")],
                     images=[media["square"], media["tall"]])
    with pytest.raises(DataError) as info:
        _render(images, tok, max_images=1)
    assert info.value.reason == "over_limit"
    assert str(info.value).startswith("/data/unit.jsonl:7: 2 images, the limit is 1")
    assert _render(images, tok, max_images=2).pixel_values.shape[0] == 4

    videos = _sample([Message("user", "<video><video>"), Message("assistant", "ok")],
                     videos=[media["frames"], media["clip"]])
    for grids_only in (False, True):
        with pytest.raises(DataError) as info:
            _render(videos, tok, max_frames=5, grids_only=grids_only)
        assert info.value.reason == "over_limit" and "more than 5 video frames" in str(info.value)
    assert sum(_render(videos, tok, max_frames=6).num_frames) == 6


def test_max_tiles_override(tok, media):
    sample = _sample([Message("user", "<image>"), Message("assistant", "Wide.")],
                     images=[media["wide"]])
    assert _render(sample, tok, max_tiles=2).image_grids == [(2, 1)]
    assert _render(sample, tok, max_tiles=1).pixel_values.shape[0] == 1
    with pytest.raises(ValueError, match="max_tiles=0"):
        _render(sample, tok, max_tiles=0)


def test_text_only_sample_has_no_pixels(tok):
    out = _render(_sample([Message("user", "Hi"), Message("assistant", "Hello")]), tok)
    assert out.pixel_values.shape == (0, 3, SIZE, SIZE)
    assert out.image_grids == [] and out.num_frames == []
    assert out.source == "unit" and out.line == 7


def test_errors_name_the_record(tok, media):
    mismatch = _sample([Message("user", "<image>"), Message("assistant", "a")],
                       images=[media["square"], media["tall"]])
    with pytest.raises(DataError) as info:
        _render(mismatch, tok)
    assert info.value.reason == "tag_count_mismatch"
    assert (info.value.path, info.value.line) == ("/data/unit.jsonl", 7)

    missing = _sample([Message("user", "<image>"), Message("assistant", "a")],
                      images=["/nowhere/gone.png"], line=3)
    for grids_only in (False, True):
        with pytest.raises(DataError) as info:
            _render(missing, tok, grids_only=grids_only)
        assert info.value.reason == "missing_file"
        assert str(info.value).startswith("/data/unit.jsonl:3: /nowhere/gone.png")


def test_llava_conversations_render_like_messages(tok, media, tmp_path):
    root = str(tmp_path)
    llava = {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                               {"from": "gpt", "value": "Noise."},
                               {"from": "human", "value": "Sure?"},
                               {"from": "gpt", "value": "Yes."}],
             "images": [media["tall"]]}
    chat = {"messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                         {"role": "assistant", "content": "Noise."},
                         {"role": "user", "content": "Sure?"},
                         {"role": "assistant", "content": "Yes."}],
            "images": [media["tall"]]}
    outs = [_render(parse_line(json.dumps(record), source="s", root=root, path="x.jsonl",
                               line=1), tok)
            for record in (llava, chat)]
    assert torch.equal(outs[0].input_ids, outs[1].input_ids)
    assert torch.equal(outs[0].labels, outs[1].labels)
    assert torch.equal(outs[0].pixel_values, outs[1].pixel_values)
    text = tok.decode(outs[0].input_ids[outs[0].labels != IGNORE_INDEX].tolist())
    assert text == "Noise.<|im_end|>\nYes.<|im_end|>\n"
