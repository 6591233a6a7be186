"""InternVL dynamic tiling: pick a tile grid for an image and cut it into square tiles.

Rule (Long-VITA uses min 1, max 12 tiles of 448): among grids (cols, rows) with
``min_tiles <= cols*rows <= max_tiles``, take the one whose aspect ratio cols/rows is closest to
width/height. Grids are visited in `candidate_grids` order; a later grid that ties exactly
replaces the current choice only if the image area exceeds half the area of that grid's tiles,
``w*h > 0.5 * tile_size**2 * cols*rows`` (so small images do not get more tiles than they fill).
The image is resized (bicubic, aspect not kept) to (tile_size*cols, tile_size*rows) and cut
row-major; a thumbnail (the whole image resized to one tile) exists only when there is more
than one tile.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

from PIL import Image

Grid = Tuple[int, int]  # (cols, rows)


@dataclass
class TiledImage:
    """The tiles of one image: `tiles` row-major, `thumbnail` only when `len(tiles) > 1`."""

    grid: Grid
    tiles: List[Image.Image]
    thumbnail: Optional[Image.Image]


def candidate_grids(min_tiles: int, max_tiles: int) -> List[Grid]:
    """Every (cols, rows) with ``min_tiles <= cols*rows <= max_tiles``, in InternVL's order.

    The order is by tile count; within one count it is the iteration order of the (CPython) set
    InternVL builds (insertion over n = min..max, cols = 1..n, rows = 1..n). That order only
    decides exact ties between two grids of the same count, which the rule resolves in favour
    of the later one when the image is large enough, so it is reproduced rather than replaced
    by a "nicer" one.
    """
    return list(_checked_grids(min_tiles, max_tiles))


def _checked_grids(min_tiles: int, max_tiles: int) -> Tuple[Grid, ...]:
    if not (isinstance(min_tiles, int) and isinstance(max_tiles, int)) or not 1 <= min_tiles <= max_tiles:
        raise ValueError(
            f"need integers 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}"
        )
    return _ordered_grids(min_tiles, max_tiles)


@lru_cache(maxsize=32)
def _ordered_grids(min_tiles: int, max_tiles: int) -> Tuple[Grid, ...]:
    grids = set()
    for count in range(min_tiles, max_tiles + 1):
        for cols in range(1, count + 1):
            for rows in range(1, count + 1):
                if min_tiles <= cols * rows <= max_tiles:
                    grids.add((cols, rows))
    # NOTE: sorted() is stable, so the set's iteration order survives within one tile count.
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def choose_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448
) -> Grid:
    """The (cols, rows) tile grid InternVL's dynamic preprocessing picks for a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    best_grid: Grid = (1, 1)
    best_diff = float("inf")
    for cols, rows in _checked_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best_grid = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best_grid = (cols, rows)
    return best_grid


def tile_image(
    image: Image.Image, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448
) -> TiledImage:
    """Cut `image` into the tiles of `choose_grid` (row-major) plus a thumbnail when > 1 tile."""
    width, height = image.size
    cols, rows = choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.BICUBIC)
    tiles = [
        resized.crop((col * tile_size, row * tile_size, (col + 1) * tile_size, (row + 1) * tile_size))
        for row in range(rows)
        for col in range(cols)
    ]
    thumbnail = image.resize((tile_size, tile_size), Image.BICUBIC) if len(tiles) > 1 else None
    return TiledImage(grid=(cols, rows), tiles=tiles, thumbnail=thumbnail)
