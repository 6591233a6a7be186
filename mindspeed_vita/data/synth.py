"""A small synthetic multimodal dataset shaped like Long-VITA's mixture, for demos and tests.

`write_synthetic_dataset` draws coloured shapes (circle / square / triangle) and writes, for a
seed, byte-identical JSONL records that mimic each data group of the paper's Table 1:

| source              | mimics                                   | S1  | S2  | S3  | S4  |
|---------------------|------------------------------------------|-----|-----|-----|-----|
| synth_image_caption | LLaVA-ReCap, ShareGPT4V (captions)       | 1.0 | 1.0 | 0.1 | 0.1 |
| synth_image_qa      | LLaVA-OneVision, the-cauldron (QA)       | 0.0 | 1.0 | 0.1 | 0.1 |
| synth_comic         | Comic-9K (3-6 panels + synopsis)         | 0.0 | 0.0 | 1.0 | 1.0 |
| synth_video_qa      | VideoGPT-plus, ShareGemini (short video) | 0.0 | 1.0 | 0.1 | 0.1 |
| synth_video_caption | LLaVA-Video-178K (detailed captions)     | 0.0 | 0.0 | 1.0 | 1.0 |
| synth_movie         | MovieNet-Summary (many clips + synopsis) | 0.0 | 0.0 | 0.0 | 1.0 |
| synth_text_short    | OpenHermes, MetaMathQA (short text)      | 0.0 | 1.0 | 0.1 | 0.1 |
| synth_text_long     | LongAlign, LongWriter (long text)        | 0.0 | 0.0 | 1.0 | 1.0 |

Images vary in size and aspect ratio so the tile grid varies; every fourth video is a
directory of numbered png frames instead of an mp4. Items (images, comics, clips, texts) are
split into train and held-out before records are made, so held-out media are never trained on.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import av
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (38, 84, 212),
    "yellow": (236, 196, 32),
    "purple": (128, 60, 170),
    "orange": (240, 128, 32),
    "black": (24, 24, 24),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "light grey": (206, 206, 206),
    "pale blue": (204, 226, 246),
    "beige": (240, 228, 200),
}
#: 3x3 grid of named positions -> (x, y) as fractions of the canvas
POSITIONS = {
    "top left": (0.22, 0.22), "top": (0.5, 0.22), "top right": (0.78, 0.22),
    "left": (0.22, 0.5), "centre": (0.5, 0.5), "right": (0.78, 0.5),
    "bottom left": (0.22, 0.78), "bottom": (0.5, 0.78), "bottom right": (0.78, 0.78),
}
#: where a position is, as a phrase ("sits {AT}") and as a noun ("moves to {THE}")
AT = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom", "bottom right": "in the bottom right corner",
}
THE = {
    "top left": "the top left corner", "top": "the top edge", "top right": "the top right corner",
    "left": "the left side", "centre": "the centre", "right": "the right side",
    "bottom left": "the bottom left corner", "bottom": "the bottom edge", "bottom right": "the bottom right corner",
}
#: shape radius as a fraction of the canvas's shorter side. Large enough that a shape fills whole
#: visual tokens of the tiny demo model (56-pixel tiles, one token per 28x28 pixels): with radii
#: of 0.07-0.15 a shape covered a fraction of a token and the demo never learned colours. Shapes
#: of one picture sit on grid cells that are not neighbours (`_random_shapes`), 0.56 apart, so
#: two large shapes (2 x 0.24) never overlap.
SIZES = {"small": 0.16, "medium": 0.2, "large": 0.24}
#: (width units, height units) and the longer side in pixels; chosen so the tile grid varies
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (3, 1), (1, 3), (4, 1), (5, 2))
LONG_SIDES = (224, 336, 448, 672, 896, 1344)
VIDEO_SIZES = ((160, 120), (128, 128), (192, 108), (96, 160), (224, 96))
VIDEO_FPS = 8
SHAPE_FACTS = {
    "circle": "Its outline is perfectly round and it has no corners at all.",
    "square": "It has four equal straight sides that meet in four right-angled corners.",
    "triangle": "It points upwards and has three straight sides and three corners.",
}
#: stage ratios per source (stage 1..4), after the paper's Table 1
STAGE_RATIOS = {
    "image_caption": (1.0, 1.0, 0.1, 0.1),
    "image_qa": (0.0, 1.0, 0.1, 0.1),
    "comic": (0.0, 0.0, 1.0, 1.0),
    "video_qa": (0.0, 1.0, 0.1, 0.1),
    "video_caption": (0.0, 0.0, 1.0, 1.0),
    "movie": (0.0, 0.0, 0.0, 1.0),
    "text_short": (0.0, 1.0, 0.1, 0.1),
    "text_long": (0.0, 0.0, 1.0, 1.0),
}


@dataclass(frozen=True)
class Shape:
    """One drawn shape; its words are what captions and answers are made of."""

    kind: str
    colour: str
    size: str
    position: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def write_synthetic_dataset(
    out_dir: str,
    *,
    seed: int = 0,
    n_single: int = 64,
    n_comic: int = 16,
    n_video: int = 8,
    n_text: int = 32,
    heldout_fraction: float = 0.1,
    stage_ratios: Optional[Dict[str, Tuple[float, float, float, float]]] = None,
) -> Dict[str, str]:
    """Write the synthetic dataset under `out_dir` and return its paths by name.

    Keys: "root", one per source ("image_caption", ..., "text_long") and its held-out file
    ("<source>_heldout"), "stage1" .. "stage4" (mixture YAMLs) and "heldout" (a mixture of every
    held-out file). `n_single` images each yield a caption and a QA record; `n_video` clips each
    yield a QA and a caption record, and training clips are also grouped by three into "movies";
    `n_text` is split between short and long text. `stage_ratios`: per-source ratios of the
    four stage mixtures that replace `STAGE_RATIOS`' (the paper's) for the sources it names.
    Same seed, same bytes.
    """
    ratios = {**STAGE_RATIOS, **(stage_ratios or {})}
    unknown = sorted(set(ratios) - set(STAGE_RATIOS))
    if unknown:
        raise ValueError(f"stage_ratios: unknown source(s) {unknown}; known: {sorted(STAGE_RATIOS)}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    for name, count in (("n_single", n_single), ("n_comic", n_comic), ("n_video", n_video), ("n_text", n_text)):
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)

    def rng(kind: str) -> random.Random:
        # NOTE: one generator per kind, seeded by a string (stable across runs and processes),
        # so changing n_video does not change the images
        return random.Random(f"mindspeed-vita-synth/{seed}/{kind}")

    records: Dict[str, Tuple[List[dict], List[dict]]] = {}
    records["image_caption"], records["image_qa"] = _write_single_images(
        out_dir, rng("single"), n_single, heldout_fraction
    )
    records["comic"] = _write_comics(out_dir, rng("comic"), n_comic, heldout_fraction)
    records["video_qa"], records["video_caption"], records["movie"] = _write_videos(
        out_dir, rng("video"), n_video, heldout_fraction
    )
    records["text_short"], records["text_long"] = _make_texts(rng("text"), n_text, heldout_fraction)

    paths = {"root": out_dir}
    for name, (train, heldout) in records.items():
        paths[name] = _write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), train)
        paths[f"{name}_heldout"] = _write_jsonl(os.path.join(out_dir, f"{name}_heldout.jsonl"), heldout)
    for stage in range(4):
        sources = [(name, ratios[name][stage]) for name, (train, _) in records.items() if train]
        paths[f"stage{stage + 1}"] = _write_mixture(
            os.path.join(out_dir, f"stage{stage + 1}.yaml"), f"stage {stage + 1}", sources, suffix=""
        )
    heldout_sources = [(name, 1.0) for name, (_, heldout) in records.items() if heldout]
    paths["heldout"] = _write_mixture(
        os.path.join(out_dir, "heldout.yaml"), "held-out evaluation", heldout_sources, suffix="_heldout"
    )
    return paths


# ---------------------------------------------------------------- files


def _write_jsonl(path: str, records: Sequence[dict]) -> str:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _write_mixture(path: str, title: str, sources: Sequence[Tuple[str, float]], *, suffix: str) -> str:
    lines = [f"# synthetic mixture, {title} (written by mindspeed_vita.data.synth)", "sources:"]
    for name, ratio in sources:
        if ratio == 0.0:  # a ratio of 0 drops the source; leave it out altogether
            continue
        lines += [
            f"  - name: synth_{name}{suffix}",
            f"    path: {name}{suffix}.jsonl",
            "    root: .",
            f"    ratio: {ratio}",
            "    num: null",
        ]
    if len(lines) == 2:
        lines[1] = "sources: []"
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _split(items: List, fraction: float) -> Tuple[List, List]:
    """Last items go to held-out: round(n * fraction), at least one when fraction > 0 and n >= 2."""
    n_heldout = int(round(len(items) * fraction))
    if fraction > 0 and len(items) >= 2:
        n_heldout = max(n_heldout, 1)
    n_heldout = min(n_heldout, max(len(items) - 1, 0))
    return items[: len(items) - n_heldout], items[len(items) - n_heldout :]


def _a(word: str) -> str:
    """`word` with its indefinite article ("an orange", "a red")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- drawing


def _centre(shape: Shape, width: int, height: int) -> Tuple[float, float, float]:
    fx, fy = POSITIONS[shape.position]
    return fx * width, fy * height, SIZES[shape.size] * min(width, height)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, radius: float, colour) -> None:
    box = (x - radius, y - radius, x + radius, y + radius)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x, y - radius), (x + radius, y + radius * 0.8), (x - radius, y + radius * 0.8)], fill=colour)


def _render(shapes: Sequence[Shape], width: int, height: int, background: str) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        x, y, radius = _centre(shape, width, height)
        _draw_shape(draw, shape.kind, x, y, radius, COLOURS[shape.colour])
    return image


def _apart(positions: Sequence[str]) -> bool:
    """No two of `positions` are neighbouring cells of the 3x3 grid (diagonals included)."""
    cells = [(round(POSITIONS[p][0] * 2), round(POSITIONS[p][1] * 2)) for p in positions]
    return all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2
               for i, a in enumerate(cells) for b in cells[i + 1:])


def _random_shapes(rng: random.Random, count: int, *, apart: bool = False) -> List[Shape]:
    """`count` shapes with distinct names on distinct grid cells; `apart`: on cells that are not
    neighbours (a still picture, where shapes must not overlap; at most 4 such cells exist)."""
    if apart and count > 4:
        raise ValueError(f"at most 4 shapes fit on non-neighbouring cells, asked for {count}")
    positions = rng.sample(sorted(POSITIONS), count)
    while apart and not _apart(positions):
        positions = rng.sample(sorted(POSITIONS), count)
    # distinct (colour, kind) pairs so "the red circle" always names one shape
    pairs = rng.sample([(colour, kind) for colour in sorted(COLOURS) for kind in SHAPES], count)
    return [
        Shape(kind, colour, rng.choice(sorted(SIZES)), position) for (colour, kind), position in zip(pairs, positions)
    ]


def _orientation(width: int, height: int) -> str:
    ratio = width / height
    if ratio >= 2.5:
        return "very wide, panoramic"
    if ratio > 1.05:
        return "landscape"
    if ratio <= 0.4:
        return "very tall"
    if ratio < 0.95:
        return "portrait"
    return "square"


# ---------------------------------------------------------------- single images


def _write_single_images(out_dir: str, rng: random.Random, count: int, heldout_fraction: float):
    items = []
    for index in range(count):
        aspect_w, aspect_h = rng.choice(ASPECTS)
        long_side = rng.choice(LONG_SIDES)
        scale = long_side / max(aspect_w, aspect_h)
        width, height = max(32, round(aspect_w * scale)), max(32, round(aspect_h * scale))
        background = rng.choice(sorted(BACKGROUNDS))
        shapes = _random_shapes(rng, rng.randint(1, 3), apart=True)
        # every fifth image is a JPEG so both decoders are exercised
        relative = f"images/single_{index:04d}.{'jpg' if index % 5 == 4 else 'png'}"
        _render(shapes, width, height, background).save(os.path.join(out_dir, relative))
        items.append((relative, width, height, background, shapes))

    train, heldout = _split(items, heldout_fraction)
    split_records = []
    for part in (train, heldout):
        captions = [_caption_record(rng, *item) for item in part]
        questions = [_qa_record(rng, *item) for item in part]
        split_records.append((captions, questions))
    (train_captions, train_qa), (heldout_captions, heldout_qa) = split_records
    return (train_captions, heldout_captions), (train_qa, heldout_qa)


def _describe_scene(width: int, height: int, background: str, shapes: Sequence[Shape]) -> List[str]:
    sentences = [
        f"This is a {_orientation(width, height)} image, {width} pixels wide and {height} pixels tall, "
        f"with a plain {background} background.",
        f"It contains {len(shapes)} shape{'s' if len(shapes) > 1 else ''}.",
    ]
    for shape in shapes:
        sentences.append(f"A {shape.size} {shape.name} sits {AT[shape.position]}.")
        sentences.append(SHAPE_FACTS[shape.kind])
    for first, second in zip(shapes, shapes[1:]):
        sentences.append(_relation(first, second))
    sentences.append(
        "Everything is drawn in flat colour without shading, texture, shadows or text, "
        "so the picture looks like a simple diagram rather than a photograph."
    )
    return sentences


def _relation(first: Shape, second: Shape) -> str:
    (x1, y1), (x2, y2) = POSITIONS[first.position], POSITIONS[second.position]
    parts = []
    if y1 != y2:
        parts.append("above" if y1 < y2 else "below")
    if x1 != x2:
        parts.append("to the left of" if x1 < x2 else "to the right of")
    return f"The {first.name} is {' and '.join(parts)} the {second.name}."


def _caption_record(rng: random.Random, relative: str, width: int, height: int, background: str, shapes) -> dict:
    prompt = rng.choice(
        (
            "Describe this image in detail.",
            "What do you see in this picture? Please be thorough.",
            "Write a detailed caption for this image.",
            "Give a complete description of the image, including every shape and where it is.",
        )
    )
    answer = " ".join(_describe_scene(width, height, background, shapes))
    return {"messages": [_user(f"<image>\n{prompt}"), _assistant(answer)], "images": [relative]}


def _qa_record(rng: random.Random, relative: str, width: int, height: int, background: str, shapes) -> dict:
    listing = ", ".join(f"a {s.size} {s.name} {AT[s.position]}" for s in shapes)
    topmost = min(shapes, key=lambda s: (POSITIONS[s.position][1], POSITIONS[s.position][0]))
    absent_colour, absent_kind = rng.choice(
        [(c, k) for c in sorted(COLOURS) for k in SHAPES if all((c, k) != (s.colour, s.kind) for s in shapes)]
    )
    probe = rng.choice(shapes)
    exchanges = [
        (
            "How many shapes can you see, and what are they?",
            f"I can see {len(shapes)} shape{'s' if len(shapes) > 1 else ''}: {listing}. "
            f"They are drawn on a plain {background} background that is {width} by {height} pixels.",
        ),
        (
            f"What colour is the {probe.kind}, and how big is it?",
            f"The {probe.kind} is {probe.colour}. It is {probe.size} compared with the canvas and is placed in "
            f"{AT[probe.position]}. {SHAPE_FACTS[probe.kind]}",
        ),
        (
            "Which shape is closest to the top edge of the image?",
            f"The {topmost.name} is closest to the top edge, because it sits {AT[topmost.position]}"
            + (", higher than or level with every other shape." if len(shapes) > 1 else " and it is the only shape."),
        ),
        (
            f"Is there {_a(absent_colour)} {absent_kind} in the picture?",
            f"No, there is no {absent_colour} {absent_kind}. The picture only contains {listing}.",
        ),
    ]
    chosen = rng.sample(exchanges, rng.randint(2, 3))
    messages = []
    for turn, (question, answer) in enumerate(chosen):
        messages += [_user(f"<image>\n{question}" if turn == 0 else question), _assistant(answer)]
    return {"messages": messages, "images": [relative]}


# ---------------------------------------------------------------- comics


def _neighbours(position: str) -> List[str]:
    x, y = POSITIONS[position]
    return sorted(
        name for name, (nx, ny) in POSITIONS.items() if name != position and abs(nx - x) < 0.4 and abs(ny - y) < 0.4
    )


def _write_comics(out_dir: str, rng: random.Random, count: int, heldout_fraction: float):
    records = []
    for index in range(count):
        n_panels = rng.randint(3, 6)
        width, height = rng.choice(((480, 360), (400, 400), (360, 480), (512, 288)))
        background = rng.choice(sorted(BACKGROUNDS))
        hero, companion = _random_shapes(rng, 2)  # distinct names and starting squares
        relatives, events, shapes_seen = [], [], set()
        for panel in range(n_panels):
            if panel:
                moved_from = hero.position
                hero = Shape(hero.kind, hero.colour, hero.size, rng.choice(_neighbours(hero.position)))
                event = f"In panel {panel + 1} it moves from {THE[moved_from]} to {THE[hero.position]}"
                if rng.random() < 0.3:
                    bigger = {"small": "medium", "medium": "large", "large": "large"}[hero.size]
                    if bigger != hero.size:
                        hero = Shape(hero.kind, hero.colour, bigger, hero.position)
                        event += f" and grows to {bigger}"
            else:
                event = f"In panel 1 a {hero.size} {hero.name} appears {AT[hero.position]}"
            shapes = [hero]
            if panel >= n_panels // 2 and companion.position != hero.position:
                event += (
                    f", while the {companion.name} waits {AT[companion.position]}"
                    if companion in shapes_seen
                    else f", and {_a(companion.colour)} {companion.kind} shows up {AT[companion.position]}"
                )
                shapes.append(companion)
                shapes_seen.add(companion)
            events.append(event + ".")
            relative = f"images/comic_{index:04d}_panel{panel + 1}.png"
            _render(shapes, width, height, background).save(os.path.join(out_dir, relative))
            relatives.append(relative)
        prompt = "".join(f"Panel {panel + 1}: <image>\n" for panel in range(n_panels))
        prompt += f"These {n_panels} panels form a short comic strip. Write a synopsis of the story."
        synopsis = (
            f"The comic follows a {hero.kind} coloured {hero.colour} across {n_panels} panels drawn on a "
            f"{background} background. " + " ".join(events) + f" By the last panel the {hero.name} has reached "
            f"{THE[hero.position]} and is {hero.size}. The story is a small journey: the hero keeps moving one step "
            "at a time, and the second shape acts as the goal it travels towards, so the strip reads as a quest "
            "that ends when the two shapes share the same picture."
        )
        records.append({"messages": [_user(prompt), _assistant(synopsis)], "images": relatives})
    return _split(records, heldout_fraction)


# ---------------------------------------------------------------- videos


def _direction(start: str, end: str) -> str:
    (x1, y1), (x2, y2) = POSITIONS[start], POSITIONS[end]
    vertical = "downwards" if y2 > y1 else "upwards" if y2 < y1 else ""
    horizontal = "to the right" if x2 > x1 else "to the left" if x2 < x1 else ""
    return " and ".join(part for part in (vertical, horizontal) if part)


def _clip_frames(shape_kind: str, colour: str, start: str, end: str, width: int, height: int, background: str, n: int):
    (x1, y1), (x2, y2) = POSITIONS[start], POSITIONS[end]
    radius = SIZES["medium"] * min(width, height)
    for step in range(n):
        t = step / max(n - 1, 1)
        image = Image.new("RGB", (width, height), BACKGROUNDS[background])
        x, y = (x1 + (x2 - x1) * t) * width, (y1 + (y2 - y1) * t) * height
        _draw_shape(ImageDraw.Draw(image), shape_kind, x, y, radius, COLOURS[colour])
        yield image


def _write_mp4(path: str, frames, width: int, height: int) -> None:
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = VIDEO_FPS  # a keyframe per second, so sampling can seek
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_videos(out_dir: str, rng: random.Random, count: int, heldout_fraction: float):
    clips = []
    for index in range(count):
        width, height = rng.choice(VIDEO_SIZES)
        background = rng.choice(sorted(BACKGROUNDS))
        colour, kind = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        start, end = rng.sample(sorted(POSITIONS), 2)
        if index % 4 == 3:
            # a frame directory: its source fps is taken as 1, so each png is one second; named
            # 1.png .. N.png so that natural sort order matters
            seconds = rng.randint(4, 10)
            relative = f"videos/clip_{index:04d}"
            os.makedirs(os.path.join(out_dir, relative), exist_ok=True)
            frames = _clip_frames(kind, colour, start, end, width, height, background, seconds)
            for number, image in enumerate(frames, start=1):
                image.save(os.path.join(out_dir, relative, f"{number}.png"))
        else:
            seconds = rng.randint(2, 5)
            relative = f"videos/clip_{index:04d}.mp4"
            frames = _clip_frames(kind, colour, start, end, width, height, background, seconds * VIDEO_FPS)
            _write_mp4(os.path.join(out_dir, relative), frames, width, height)
        clips.append((relative, width, height, background, colour, kind, start, end, seconds))

    train, heldout = _split(clips, heldout_fraction)
    qa = ([_video_qa_record(rng, clip) for clip in train], [_video_qa_record(rng, clip) for clip in heldout])
    captions = ([_video_caption_record(clip) for clip in train], [_video_caption_record(clip) for clip in heldout])
    order = list(train)
    rng.shuffle(order)
    movies = [_movie_record(order[i : i + 3]) for i in range(0, len(order) - 2, 3)]
    return qa, captions, (movies, [])


def _video_qa_record(rng: random.Random, clip) -> dict:
    relative, width, height, background, colour, kind, start, end, seconds = clip
    question, answer = rng.choice(
        (
            (
                "In which direction does the shape move?",
                f"The {colour} {kind} moves {_direction(start, end)}: it starts {AT[start]} of the frame and "
                f"ends {AT[end]}. It travels in a straight line at a steady speed for the whole clip, which "
                f"lasts about {seconds} seconds, and it never stops or changes colour on the way.",
            ),
            (
                "What is moving in this video, and where does it end up?",
                f"{_a(colour).capitalize()} {kind} is the only moving object. It glides from {THE[start]} to "
                f"{THE[end]} over about {seconds} seconds, so at the end of the video it rests {AT[end]} of "
                f"the {background} frame.",
            ),
        )
    )
    return {"messages": [_user(f"<video>\n{question}"), _assistant(answer)], "videos": [relative]}


def _video_caption_record(clip) -> dict:
    relative, width, height, background, colour, kind, start, end, seconds = clip
    answer = (
        f"The video is a short clip of about {seconds} seconds, {width} by {height} pixels, showing a "
        f"{_orientation(width, height)} scene with a plain {background} background. A medium {colour} {kind} "
        f"appears {AT[start]} at the very beginning. {SHAPE_FACTS[kind]} As the clip plays, the {kind} moves "
        f"{_direction(start, end)} in a straight line and at a constant speed, without rotating, growing or "
        f"changing colour. Nothing else enters the frame and the background stays still, so the only change "
        f"from frame to frame is the position of the {kind}. In the final frames it reaches {THE[end]}, where "
        f"the clip ends."
    )
    return {"messages": [_user("<video>\nDescribe this video in detail."), _assistant(answer)], "videos": [relative]}


def _movie_record(clips) -> dict:
    prompt = "".join(f"Clip {number}: <video>\n" for number in range(1, len(clips) + 1))
    prompt += "These clips are the scenes of one short film. Summarise the whole film."
    scenes = [
        f"In scene {number}, {_a(colour)} {kind} travels {_direction(start, end)} from {THE[start]} to {THE[end]} "
        f"against a {background} backdrop, taking about {seconds} seconds."
        for number, (_, _, _, background, colour, kind, start, end, seconds) in enumerate(clips, start=1)
    ]
    total = sum(clip[-1] for clip in clips)
    answer = (
        f"The film has {len(clips)} scenes and runs for about {total} seconds in total. "
        + " ".join(scenes)
        + " Each scene follows a single shape on its own path, so the film reads as a set of short journeys "
        "rather than one continuous chase."
    )
    return {"messages": [_user(prompt), _assistant(answer)], "videos": [clip[0] for clip in clips]}


# ---------------------------------------------------------------- text


def _make_texts(rng: random.Random, count: int, heldout_fraction: float):
    n_long = count // 2
    short = [_short_text_record(rng) for _ in range(count - n_long)]
    long = [_long_text_record(rng, index) for index in range(n_long)]
    return _split(short, heldout_fraction), _split(long, heldout_fraction)


def _short_text_record(rng: random.Random) -> dict:
    colour, colour2 = rng.sample(sorted(COLOURS), 2)
    kind, kind2 = rng.sample(SHAPES, 2)
    template = rng.randrange(4)
    if template == 0:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a)
        question = (
            f"A bag holds {a} {colour} {kind}s and {b} {colour2} {kind2}s. {c} of the {kind}s are taken out. "
            "How many shapes are left in the bag?"
        )
        answer = (
            f"Start with the {kind}s: {a} - {c} = {a - c} remain. The {kind2}s are not touched, so there are still "
            f"{b} of them. Adding both groups gives {a - c} + {b} = {a - c + b}. So {a - c + b} shapes are left."
        )
    elif template == 1:
        side = rng.randint(2, 25)
        question = f"A square has sides of {side} cm. What are its perimeter and its area?"
        answer = (
            f"A square has four equal sides, so its perimeter is 4 x {side} = {4 * side} cm. Its area is side times "
            f"side, {side} x {side} = {side * side} square centimetres. The perimeter is {4 * side} cm and the area "
            f"is {side * side} cm^2."
        )
    elif template == 2:
        n, width, gap = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 4)
        total = n * width + (n - 1) * gap
        question = (
            f"{n} {colour} triangles stand in a row. Each is {width} cm wide and there is a {gap} cm gap between "
            "neighbours. How long is the row?"
        )
        answer = (
            f"The triangles themselves take {n} x {width} = {n * width} cm. Between {n} triangles there are "
            f"{n - 1} gaps, which take {n - 1} x {gap} = {(n - 1) * gap} cm. The row is {n * width} + "
            f"{(n - 1) * gap} = {total} cm long."
        )
    else:
        radius = rng.randint(1, 20)
        question = (
            f"{_a(colour).capitalize()} circle has a radius of {radius} cm. "
            "What is its circumference, to two decimals?"
        )
        answer = (
            f"The circumference of a circle is 2 x pi x r. With r = {radius} cm this is 2 x 3.14159... x {radius} "
            f"= {2 * math.pi * radius:.2f} cm, so the circumference is about {2 * math.pi * radius:.2f} cm."
        )
    return {"messages": [_user(question), _assistant(answer)]}


def _long_text_record(rng: random.Random, index: int) -> dict:
    """Alternately a long document with a question about it, and a long writing task (LLaVA style keys)."""
    if index % 2 == 0:
        question, answer = _logbook_task(rng)
    else:
        question, answer = _story_task(rng)
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _logbook_task(rng: random.Random) -> Tuple[str, str]:
    characters = _random_shapes(rng, rng.randint(4, 6))
    where = {shape.name: shape.position for shape in characters}
    moves: Dict[str, List[Tuple[int, str, str]]] = {shape.name: [] for shape in characters}
    lines = [f"Day 0: the {name} starts in the {position} cell." for name, position in where.items()]
    for day in range(1, rng.randint(60, 160) + 1):
        name = rng.choice(sorted(where))
        destination = rng.choice(_neighbours(where[name]))
        lines.append(f"Day {day}: the {name} moved from the {where[name]} cell to the {destination} cell.")
        moves[name].append((day, where[name], destination))
        where[name] = destination
    target = rng.choice(sorted(where))
    history = moves[target]
    question = (
        "Here is the logbook of a board where coloured shapes move between nine cells.\n\n"
        + "\n".join(lines)
        + f"\n\nHow many times did the {target} move, and where is it at the end of the log? Explain."
    )
    if history:
        steps = "; ".join(f"on day {day} from the {a} cell to the {b} cell" for day, a, b in history)
        answer = (
            f"The {target} moved {len(history)} time{'s' if len(history) > 1 else ''}: {steps}. "
            f"Its last move was on day {history[-1][0]}, so at the end of the log it is in the {where[target]} cell."
        )
    else:
        answer = (
            f"The {target} never moved after day 0, so it is still in the {where[target]} cell at the end of the log."
        )
    return question, answer


def _story_task(rng: random.Random) -> Tuple[str, str]:
    hero, *friends = _random_shapes(rng, 4)
    question = (
        f"Write a long story, at least ten paragraphs, about {_a(hero.colour)} {hero.kind} that travels across a "
        "board of nine cells looking for a friend."
    )
    paragraphs = [
        f"Once upon a time, on a quiet board of nine cells, there lived a {hero.size} {hero.name}. "
        f"Every morning it woke up in the {hero.position} cell and looked around at the empty cells. "
        f"{SHAPE_FACTS[hero.kind]} It had everything it needed except a friend to share the board with."
    ]
    position = hero.position
    for number in range(rng.randint(9, 14)):
        destination = rng.choice(_neighbours(position))
        friend = rng.choice(friends)
        mood = rng.choice(("hopeful", "tired", "curious", "determined", "a little lonely", "cheerful"))
        paragraphs.append(
            f"On day {number + 1} the {hero.kind} felt {mood}. It left the {position} cell and rolled towards the "
            f"{destination} cell, counting its steps as it went. Along the way it thought about the {friend.name} it "
            f"had heard stories about, a shape said to live somewhere near the {friend.position} cell. When it "
            f"arrived in the {destination} cell, it searched every corner of the cell, found only silence, and "
            f"decided that tomorrow it would try again in a different direction."
        )
        position = destination
    friend = friends[0]
    paragraphs.append(
        f"At last, in the {position} cell, the {hero.name} met the {friend.name}. The two shapes were very different, "
        f"one a {hero.kind} and the other a {friend.kind}, but they discovered that they both liked quiet "
        "mornings and long walks across the board. From that day on, the board never felt empty again."
    )
    return question, "\n\n".join(paragraphs)
