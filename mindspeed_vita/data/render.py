"""Sample -> RenderedSample: load media, render the conversation, line pixels up with tokens.

Visual units are stacked in the order their context spans appear in the ids: media in tag
order across turns (images and videos interleaved as the tags are), and within one image the
order of its layout (long-vita: thumbnail then tiles row-major; internvl: tiles then
thumbnail). Unit k therefore fills context tokens [k*T, (k+1)*T) of the sequence.

`grids_only=True` is the dry mode of `data inspect`: grids come from image headers and frame
counts from the video index, no pixel is decoded, and `pixel_values` is empty.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from mindspeed_vita.config.model import ModelConfig
from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.images import image_to_tiles_tensor, load_image, read_image_size
from mindspeed_vita.data.template import (image_units, media_tag_order,
                                          render_conversation)
from mindspeed_vita.data.tiling import Grid, choose_grid
from mindspeed_vita.data.tokenizer import VitaTokenizer
from mindspeed_vita.data.types import RenderedSample, Sample
from mindspeed_vita.data.video import load_video_frames, sampled_frame_count


def render_sample(
    sample: Sample,
    tokenizer: VitaTokenizer,
    *,
    model_cfg: ModelConfig,
    max_num_frame: int,
    max_images: Optional[int] = None,
    max_frames: Optional[int] = None,
    max_tiles: Optional[int] = None,
    grids_only: bool = False,
    add_generation_prompt: bool = False,
    system_prompt: Optional[str] = None,
) -> RenderedSample:
    """Load the media of `sample`, render its conversation and return ids, labels and pixels.

    `max_num_frame` caps the frames sampled from each video; `max_images` caps the images and
    `max_frames` the total sampled frames of the sample (None: no cap). `max_tiles` overrides
    `model_cfg.max_tiles`. With `grids_only`, nothing is decoded and `pixel_values` is empty
    (shape [0, 3, S, S]); ids, labels, grids and frame counts are the same as a full render.
    `add_generation_prompt` / `system_prompt` are for inference requests.

    Every rejection is a DataError addressed to the sample's file and line: "over_limit",
    "tag_count_mismatch", the media loaders' "missing_file" / "corrupt_image" /
    "corrupt_video", and the template's reasons.
    """
    try:
        return _render(sample, tokenizer, model_cfg=model_cfg, max_num_frame=max_num_frame,
                       max_images=max_images, max_frames=max_frames, max_tiles=max_tiles,
                       grids_only=grids_only, add_generation_prompt=add_generation_prompt,
                       system_prompt=system_prompt)
    except DataError as error:
        raise error.at(sample.path, sample.line) from None


def _render(sample: Sample, tokenizer: VitaTokenizer, *, model_cfg: ModelConfig,
            max_num_frame: int, max_images: Optional[int], max_frames: Optional[int],
            max_tiles: Optional[int], grids_only: bool, add_generation_prompt: bool,
            system_prompt: Optional[str]) -> RenderedSample:
    size = model_cfg.vision.image_size
    tile_max = model_cfg.max_tiles if max_tiles is None else max_tiles
    tile_min = model_cfg.min_tiles
    if not 1 <= tile_min <= tile_max:
        raise ValueError(f"max_tiles={tile_max} is below model.min_tiles={tile_min}")
    if max_images is not None and len(sample.images) > max_images:
        raise DataError("over_limit", f"{len(sample.images)} images, the limit is {max_images}")
    order = media_tag_order(sample.messages)
    if order.count("image") != len(sample.images) or order.count("video") != len(sample.videos):
        # the template reports the same mismatch; checking first avoids decoding media for it
        raise DataError("tag_count_mismatch",
                        f"{order.count('image')} <image> and {order.count('video')} <video> "
                        f"tag(s) in the conversation but {len(sample.images)} image(s) and "
                        f"{len(sample.videos)} video(s)")

    grids: List[Grid] = []
    image_pixels: List[torch.Tensor] = []
    for path in sample.images:
        if grids_only:
            width, height = read_image_size(path)
            grids.append(choose_grid(width, height, min_tiles=tile_min, max_tiles=tile_max,
                                     tile_size=size))
        else:
            pixels, grid = image_to_tiles_tensor(load_image(path), min_tiles=tile_min,
                                                 max_tiles=tile_max, tile_size=size,
                                                 layout=model_cfg.image_layout)
            grids.append(tuple(grid))
            image_pixels.append(pixels)

    frames: List[int] = []
    video_pixels: List[torch.Tensor] = []
    for path in sample.videos:
        if grids_only:
            frames.append(sampled_frame_count(path, max_num_frame=max_num_frame))
        else:
            pixels = load_video_frames(path, max_num_frame=max_num_frame, frame_size=size)
            frames.append(int(pixels.shape[0]))
            video_pixels.append(pixels)
        if max_frames is not None and sum(frames) > max_frames:
            raise DataError("over_limit",
                            f"more than {max_frames} video frames (reached {sum(frames)} at "
                            f"video {len(frames) - 1}: {path})")

    input_ids, labels = render_conversation(
        sample.messages, tokenizer, image_grids=grids, video_frames=frames,
        tokens_per_tile=model_cfg.tokens_per_tile, layout=model_cfg.image_layout,
        system_prompt=system_prompt, add_generation_prompt=add_generation_prompt)

    if grids_only:
        pixel_values = torch.zeros(0, 3, size, size, dtype=torch.float32)
    else:
        pixel_values = _interleave(order, image_pixels, video_pixels, size)
    n_units = sum(image_units(g) for g in grids) + sum(frames)
    n_context = sum(1 for i in input_ids if i in tokenizer.context_token_ids)
    if n_context != n_units * model_cfg.tokens_per_tile or (
            not grids_only and pixel_values.shape[0] != n_units):
        raise RuntimeError(
            f"render bug: {n_context} context tokens, {n_units} visual units of "
            f"{model_cfg.tokens_per_tile} tokens, {pixel_values.shape[0]} pixel units")
    return RenderedSample(
        source=sample.source,
        line=sample.line,
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        pixel_values=pixel_values,
        image_grids=grids,
        num_frames=frames,
    )


def _interleave(order: List[str], image_pixels: List[torch.Tensor],
                video_pixels: List[torch.Tensor], size: int) -> torch.Tensor:
    """Stack per-media unit tensors in tag order: [n_units, 3, size, size]."""
    images, videos = iter(image_pixels), iter(video_pixels)
    parts = [next(images) if kind == "image" else next(videos) for kind in order]
    if not parts:
        return torch.zeros(0, 3, size, size, dtype=torch.float32)
    return torch.cat(parts, dim=0)
