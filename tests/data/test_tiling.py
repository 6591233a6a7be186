"""Image tiling and pixel preparation against transformers' GotOcr2 processor and the InternVL rule.

GotOcr2 implements the same closest-aspect-ratio rule but visits grids of equal tile count in
another order, so it can only disagree on exact ties between two such grids; a sweep shows it
never does for min 1 / max 6 or 12, but it does for e.g. min = max = 4. So the grid choice is
also tested against a straightforward reference of the rule written here, over InternVL's order.
"""
import itertools

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_to_tiles_tensor,
    load_image,
    normalize,
    pad_to_square,
    read_image_size,
)
from mindspeed_vita.data.tiling import candidate_grids, choose_grid, tile_image

# InternVL builds its grids as a set and sorts them by tile count; these are that order on
# CPython (recorded from InternVL's own expression)
INTERNVL_ORDER_1_12 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
    (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
    (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6),
]
INTERNVL_ORDER_4_4 = [(4, 1), (1, 4), (2, 2)]

# sizes that hit every grid, the exact-tie thresholds and extreme aspect ratios
SWEEP_SIZES = sorted(
    set(range(1, 3000, 53)) | {2, 3, 447, 448, 449, 633, 634, 896, 950, 951, 1344, 4000, 5000}
)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "page", "text", "hubble_deep_field")


def internvl_order(min_tiles, max_tiles):
    """InternVL's construction written as its set comprehension (independent of the loops in tiling.py)."""
    grids = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_tiles <= i * j <= max_tiles}
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def reference_grid(width, height, order, tile_size=448):
    """The rule stated plainly: closest ratio wins; among exact ties (in order) a later grid replaces
    the earlier one only when the image area exceeds half the area of the later grid's tiles."""
    diffs = [abs(width / height - cols / rows) for cols, rows in order]
    tied = [grid for grid, diff in zip(order, diffs) if diff == min(diffs)]
    choice = tied[0]
    for cols, rows in tied[1:]:
        if width * height > 0.5 * tile_size * tile_size * cols * rows:
            choice = (cols, rows)
    return choice


def test_candidate_grids_follow_internvl_order():
    assert candidate_grids(1, 12) == INTERNVL_ORDER_1_12
    assert candidate_grids(4, 4) == INTERNVL_ORDER_4_4
    for min_tiles, max_tiles in [(1, 1), (1, 4), (1, 6), (2, 8), (3, 12), (1, 40)]:
        grids = candidate_grids(min_tiles, max_tiles)
        assert grids == internvl_order(min_tiles, max_tiles)
        expected = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles}
        assert set(grids) == expected and len(grids) == len(expected)
    for bad in [(0, 4), (5, 4), (1.0, 4)]:
        with pytest.raises(ValueError, match="min_tiles"):
            candidate_grids(*bad)


@pytest.mark.parametrize("max_tiles", [6, 12])
def test_choose_grid_matches_gotocr2_over_a_size_sweep(max_tiles):
    mismatches = []
    for width, height in itertools.product(SWEEP_SIZES, SWEEP_SIZES):
        ours = choose_grid(width, height, max_tiles=max_tiles)
        theirs = get_optimal_tiled_canvas((height, width), (448, 448), 1, max_tiles)
        if ours != tuple(theirs):
            mismatches.append((width, height, ours, theirs))
    assert not mismatches, mismatches[:10]
    assert len(SWEEP_SIZES) ** 2 > 3000


@pytest.mark.parametrize("min_tiles, max_tiles", [(1, 6), (1, 12), (2, 12), (4, 4), (6, 6), (3, 9)])
def test_choose_grid_matches_the_plain_rule(min_tiles, max_tiles):
    order = INTERNVL_ORDER_1_12 if (min_tiles, max_tiles) == (1, 12) else internvl_order(min_tiles, max_tiles)
    for width, height in itertools.product(SWEEP_SIZES[::2], SWEEP_SIZES[::2]):
        expected = reference_grid(width, height, order)
        assert choose_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles) == expected, (width, height)


def test_tie_break_prefers_more_tiles_only_for_large_images():
    # square images tie between (1,1), (2,2), (3,3): more tiles only once w*h > 0.5 * 448^2 * n
    assert choose_grid(633, 633) == (1, 1)  # 633^2 < 2 * 448^2
    assert choose_grid(634, 634) == (2, 2)
    assert choose_grid(950, 950) == (2, 2)  # 950^2 < 4.5 * 448^2
    assert choose_grid(951, 951) == (3, 3)
    assert choose_grid(4000, 4000) == (3, 3)
    assert choose_grid(1268, 634) == (4, 2) and choose_grid(1266, 633) == (2, 1)
    assert choose_grid(5000, 10, max_tiles=12) == (12, 1)
    # the equal-count tie where GotOcr2's order would give (2, 2): InternVL keeps (4, 1)
    assert choose_grid(5, 2, min_tiles=4, max_tiles=4) == (4, 1)
    assert choose_grid(2240, 896, min_tiles=4, max_tiles=4) == (2, 2)  # large: the later grid wins
    with pytest.raises(ValueError):
        choose_grid(0, 10)


def _quadrant_image(cols, rows, tile=448):
    """An image of exactly cols x rows tiles, each tile a different flat colour."""
    image = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    for row in range(rows):
        for col in range(cols):
            image[row * tile:(row + 1) * tile, col * tile:(col + 1) * tile] = (40 * col + 10, 40 * row + 10, 200)
    return Image.fromarray(image)


@pytest.mark.parametrize("cols, rows", [(2, 1), (1, 3), (3, 2)])
def test_tiles_are_row_major_with_a_thumbnail(cols, rows):
    image = _quadrant_image(cols, rows)
    tiled = tile_image(image)
    assert tiled.grid == (cols, rows) and len(tiled.tiles) == cols * rows
    for index, tile in enumerate(tiled.tiles):
        row, col = divmod(index, cols)
        assert tile.size == (448, 448)
        assert np.asarray(tile)[200, 200].tolist() == [40 * col + 10, 40 * row + 10, 200]
    assert tiled.thumbnail.size == (448, 448)
    assert np.array_equal(np.asarray(tiled.thumbnail), np.asarray(image.resize((448, 448), Image.BICUBIC)))


def test_one_tile_image_has_no_thumbnail_and_is_a_plain_resize():
    image = Image.fromarray(skimage.data.astronaut())  # 512 x 512 -> one tile
    tiled = tile_image(image)
    assert tiled.grid == (1, 1) and tiled.thumbnail is None
    assert np.array_equal(np.asarray(tiled.tiles[0]), np.asarray(image.resize((448, 448), Image.BICUBIC)))


@pytest.mark.parametrize("name", PHOTOS)
def test_photo_grids_match_gotocr2(name):
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    width, height = image.size
    for max_tiles in (6, 12):
        expected = get_optimal_tiled_canvas((height, width), (448, 448), 1, max_tiles)
        assert choose_grid(width, height, max_tiles=max_tiles) == tuple(expected)
        assert choose_grid(width, height, max_tiles=max_tiles) == reference_grid(
            width, height, internvl_order(1, max_tiles))


@pytest.mark.parametrize("name", ["chelsea", "text", "page", "astronaut"])
def test_tile_pixels_match_gotocr2_processor_exactly(name):
    """InternVL layout [tiles..., thumbnail] must equal GotOcr2's crop_to_patches output bit for bit
    (both resize with PIL bicubic; GotOcr2 is given ImageNet mean/std)."""
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                         max_patches=12, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    theirs = processor(images=[image], return_tensors="pt")
    ours, grid = image_to_tiles_tensor(image, min_tiles=1, max_tiles=12, tile_size=448, layout="internvl")
    assert ours.dtype == torch.float32 and ours.shape == theirs["pixel_values"].shape
    assert int(theirs["num_patches"][0]) == ours.shape[0] == (1 if grid == (1, 1) else grid[0] * grid[1] + 1)
    torch.testing.assert_close(ours, theirs["pixel_values"], rtol=0, atol=1e-6)


def test_layouts_order_thumbnail_first_or_last():
    image = Image.fromarray(skimage.data.coffee())  # 600 x 400 -> (3, 2)
    long_vita, grid = image_to_tiles_tensor(image, layout="long-vita")
    internvl, grid2 = image_to_tiles_tensor(image, layout="internvl")
    assert grid == grid2 == (3, 2) and long_vita.shape == (7, 3, 448, 448)
    tiled = tile_image(image)
    assert torch.equal(long_vita[0], normalize(tiled.thumbnail, 448))
    assert torch.equal(internvl[-1], long_vita[0])
    assert torch.equal(long_vita[1:], internvl[:-1])
    for index, tile in enumerate(tiled.tiles):
        assert torch.equal(long_vita[1 + index], normalize(tile, 448))
    single, one = image_to_tiles_tensor(image, max_tiles=1, layout="long-vita")
    assert one == (1, 1) and single.shape == (1, 3, 448, 448)
    with pytest.raises(ValueError, match="layout"):
        image_to_tiles_tensor(image, layout="llava")


def test_normalize_is_bicubic_resize_then_imagenet_mean_std():
    image = Image.fromarray(skimage.data.chelsea())
    out = normalize(image, 224)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    resized = np.asarray(image.resize((224, 224), Image.BICUBIC), dtype=np.float64) / 255.0
    expected = (resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-5)
    grey = normalize(Image.fromarray(skimage.data.camera()), 32)  # "L" mode is converted to RGB
    assert grey.shape == (3, 32, 32)


def test_pad_to_square_letterboxes_centred_with_the_mean_colour():
    image = Image.new("RGB", (100, 40), (255, 0, 0))
    square = pad_to_square(image)
    pixels = np.asarray(square)
    assert square.size == (100, 100)
    assert pixels[0, 0].tolist() == [123, 116, 103]  # int(255 * ImageNet mean)
    assert pixels[30:70, :].reshape(-1, 3).tolist() == [[255, 0, 0]] * 4000
    assert pixels[29, 50].tolist() == [123, 116, 103] and pixels[70, 50].tolist() == [123, 116, 103]
    tall = pad_to_square(Image.new("RGB", (10, 31), (0, 0, 255)))
    assert tall.size == (31, 31) and np.asarray(tall)[:, 10:20].reshape(-1, 3).tolist() == [[0, 0, 255]] * 310


def test_load_image_returns_rgb_and_classifies_failures(tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (20, 10), (10, 20, 30, 128)).save(rgba)
    grey = tmp_path / "grey.jpg"
    Image.new("L", (8, 8), 77).save(grey)
    assert load_image(str(rgba)).mode == "RGB" and load_image(str(rgba)).size == (20, 10)
    assert load_image(str(grey)).mode == "RGB"
    assert read_image_size(str(rgba)) == (20, 10) and read_image_size(str(grey)) == (8, 8)

    good = tmp_path / "big.png"
    Image.fromarray(skimage.data.astronaut()).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00not an image" * 10)
    for path in (truncated, garbage):
        with pytest.raises(DataError) as caught:
            load_image(str(path))
        assert caught.value.reason == "corrupt_image" and str(caught.value).startswith(str(path))
    assert read_image_size(str(truncated)) == (512, 512)  # the header alone is intact
    with pytest.raises(DataError) as caught:
        read_image_size(str(garbage))
    assert caught.value.reason == "corrupt_image"
    for reader in (load_image, read_image_size):
        with pytest.raises(DataError) as caught:
            reader(str(tmp_path / "nope.png"))
        assert caught.value.reason == "missing_file"
