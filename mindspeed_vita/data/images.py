"""Image loading and pixel preparation: PIL image -> normalised tile tensors.

Numerics follow InternVL's transform: RGB, bicubic resize to the tile size (PIL), scale to
[0, 1], then ImageNet mean/std.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch
from PIL import Image

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.tiling import Grid, tile_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the ImageNet mean as an 8-bit RGB colour (letterbox padding of video frames)
IMAGENET_MEAN_RGB = tuple(int(channel * 255) for channel in IMAGENET_MEAN)

#: unit orders of one tiled image: Long-VITA puts the thumbnail first, InternVL last
LAYOUTS = ("long-vita", "internvl")


def load_image(path: str) -> Image.Image:
    """Open an image file fully and return it as RGB.

    Raises DataError "missing_file" when there is no such file and "corrupt_image" when PIL cannot
    decode it (truncated, not an image, decompression bomb).
    """
    if not os.path.isfile(path):
        raise DataError("missing_file", "no such image file", path=path)
    try:
        with Image.open(path) as image:
            # NOTE: convert() decodes inside the try: PIL opens lazily and truncation only shows then
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError("corrupt_image", f"cannot decode image ({type(error).__name__}: {error})", path=path) from None


def read_image_size(path: str) -> Tuple[int, int]:
    """(width, height) of an image file from its header only, with `load_image`'s errors."""
    if not os.path.isfile(path):
        raise DataError("missing_file", "no such image file", path=path)
    try:
        with Image.open(path) as image:  # PIL reads the header here and decodes only on load()
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        detail = f"cannot read image header ({type(error).__name__}: {error})"
        raise DataError("corrupt_image", detail, path=path) from None


def pad_to_square(image: Image.Image, fill: Tuple[int, int, int] = IMAGENET_MEAN_RGB) -> Image.Image:
    """Letterbox `image` to a square of its longer side, centred, padding with `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def normalize(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic-resize `image` to size x size and normalise: float32 tensor [3, size, size]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [size, size, 3]
    pixels = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub_(mean).div_(std)


def image_to_tiles_tensor(
    image: Image.Image,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    tile_size: int = 448,
    layout: str = "long-vita",
) -> Tuple[torch.Tensor, Grid]:
    """Tile and normalise one image: (tensor [n_units, 3, tile_size, tile_size], (cols, rows)).

    `layout` "long-vita" orders the units [thumbnail, tiles...] and "internvl" [tiles...,
    thumbnail]; the thumbnail exists only when the grid has more than one tile, so n_units is
    1 or cols*rows + 1. Tiles are row-major.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    tiled = tile_image(image, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    units = list(tiled.tiles)
    if tiled.thumbnail is not None:
        units = [tiled.thumbnail] + units if layout == "long-vita" else units + [tiled.thumbnail]
    return torch.stack([normalize(unit, tile_size) for unit in units]), tiled.grid
