"""Conversation -> token ids + labels: ChatML frame, media spans, assistant-only loss.

One turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. The loss covers each assistant
turn's content and its closing ``<|im_end|>\\n``; every other position is IGNORE_INDEX.

Media tags in user (or system) text expand, in order, to context-token spans whose embedding
rows the visual features overwrite:

- image, layout "long-vita": ``<img>`` T x ``<IMG_CONTEXT>`` ``</img>`` for the thumbnail (the
  whole image when it is one tile); then, only when the grid has more than one tile, for each
  tile row a "\\n" and, for each tile of the row, ``<patch>`` T x ``<PATCH_CONTEXT>`` ``</patch>``.
- image, layout "internvl": ``<img>`` (tiles + thumbnail) x T ``<IMG_CONTEXT>`` ``</img>``
  (a one-tile image has no thumbnail: T context tokens).
- video: ``<vid>`` T x ``<VID_CONTEXT>`` ``</vid>`` per frame.

Text between tags is tokenised piece by piece and the special ids are spliced in directly, so
BPE never merges across a tag. The role header is its own piece, as in the Long-VITA release:
``<|im_start|>`` + ids("{role}") + ids("\\n") + ids(content) + ``<|im_end|>`` + ids("\\n").
Where no media is involved the ids therefore equal the release's training tokenisation; they
equal the HF tokenisation of the whole ChatML string except when a content starts with
whitespace containing a newline (the pre-tokenizer would join it to the header's newline).
Keeping the header apart also keeps the label boundary from falling inside a token.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.tiling import Grid
from mindspeed_vita.data.tokenizer import VitaTokenizer
from mindspeed_vita.data.types import IGNORE_INDEX, Message

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
LAYOUTS = ("long-vita", "internvl")

_TAG_PATTERN = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")
_ROLES = ("system", "user", "assistant")
#: roles whose text may carry media tags (assistant text is a loss target: no context tokens)
_MEDIA_ROLES = ("system", "user")


def image_units(grid: Grid) -> int:
    """Visual units (tiles plus thumbnail) of an image tiled as `grid` = (cols, rows)."""
    cols, rows = _checked_grid(grid)
    return cols * rows + (1 if cols * rows > 1 else 0)


def image_span_ids(tokenizer: VitaTokenizer, grid: Grid, tokens_per_tile: int,
                   layout: str = "long-vita") -> List[int]:
    """Token ids one `<image>` tag expands to, for an image tiled as `grid` = (cols, rows)."""
    cols, rows = _checked_grid(grid)
    tok = tokenizer
    if layout == "internvl":
        return ([tok.img_start_id] + [tok.img_context_id] * (image_units(grid) * tokens_per_tile)
                + [tok.img_end_id])
    if layout != "long-vita":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ids = [tok.img_start_id] + [tok.img_context_id] * tokens_per_tile + [tok.img_end_id]
    if cols * rows > 1:
        newline = tok.encode("\n")
        tile = [tok.patch_start_id] + [tok.patch_context_id] * tokens_per_tile + [tok.patch_end_id]
        for _ in range(rows):
            ids += newline
            for _ in range(cols):
                ids += tile
    return ids


def video_span_ids(tokenizer: VitaTokenizer, num_frames: int, tokens_per_tile: int) -> List[int]:
    """Token ids one `<video>` tag expands to, for a video of `num_frames` sampled frames."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    frame = [tokenizer.vid_start_id] + [tokenizer.vid_context_id] * tokens_per_tile + [
        tokenizer.vid_end_id]
    return frame * num_frames


def media_tag_order(messages: Sequence[Message]) -> List[str]:
    """The media tags of a conversation in the order they appear ("image" / "video").

    The visual units of a sample are laid out in this order, so they line up with the context
    spans of the rendered ids.
    """
    order = []
    for message in messages:
        for tag in _TAG_PATTERN.findall(message.content):
            order.append("image" if tag == IMAGE_TAG else "video")
    return order


def render_conversation(
    messages: Sequence[Message],
    tokenizer: VitaTokenizer,
    *,
    image_grids: Sequence[Grid],
    video_frames: Sequence[int],
    tokens_per_tile: int,
    layout: str = "long-vita",
    system_prompt: Optional[str] = None,
    add_generation_prompt: bool = False,
) -> Tuple[List[int], List[int]]:
    """Render `messages` to (input_ids, labels), expanding media tags into context spans.

    `image_grids[i]` is the (cols, rows) tile grid of the i-th `<image>` tag and
    `video_frames[j]` the frame count of the j-th `<video>` tag, counted across turns.
    `system_prompt` is used only when the conversation has no system turn (training uses none).
    `add_generation_prompt` appends ``<|im_start|>assistant\\n`` (no labels) for inference.

    Raises DataError "tag_count_mismatch" when tags and media counts differ, "unknown_role" for
    a role other than system/user/assistant, and "invalid_record" for a media tag in an
    assistant turn or text that contains a context token literally. The error has no file
    location; callers re-address it with `DataError.at`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    turns = list(messages)
    if system_prompt is not None and not (turns and turns[0].role == "system"):
        turns.insert(0, Message(role="system", content=system_prompt))
    _check_conversation(turns, image_grids, video_frames)
    tok = tokenizer
    turn_end = [tok.im_end_id] + tok.encode("\n")
    input_ids: List[int] = []
    labels: List[int] = []

    def append(ids: List[int], learn: bool) -> None:
        input_ids.extend(ids)
        labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))

    image_index = video_index = 0
    newline = tok.encode("\n")
    for message in turns:
        append([tok.im_start_id] + tok.encode(message.role) + newline, learn=False)
        if message.role == "assistant":
            append(_encode_text(tok, message.content), learn=True)
            append(turn_end, learn=True)
            continue
        # split() alternates text, tag, text, ...; text pieces may be empty
        pieces = _TAG_PATTERN.split(message.content)
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                append(_encode_text(tok, piece), learn=False)
            elif piece == IMAGE_TAG:
                append(image_span_ids(tok, image_grids[image_index], tokens_per_tile, layout),
                       learn=False)
                image_index += 1
            else:
                append(video_span_ids(tok, video_frames[video_index], tokens_per_tile),
                       learn=False)
                video_index += 1
        append(turn_end, learn=False)

    if add_generation_prompt:
        append([tok.im_start_id] + tok.encode("assistant") + newline, learn=False)
    return input_ids, labels


def _encode_text(tokenizer: VitaTokenizer, text: str) -> List[int]:
    """Encode a text run, refusing context tokens that would receive no visual features."""
    ids = tokenizer.encode(text) if text else []
    reserved = tokenizer.context_token_ids.intersection(ids)
    if reserved:
        names = sorted(tokenizer.decode([i]) for i in reserved)
        raise DataError("invalid_record",
                        f"the text contains the reserved token(s) {names}, which only media tags "
                        f"may produce")
    return ids


def _check_conversation(messages: Sequence[Message], image_grids: Sequence[Grid],
                        video_frames: Sequence[int]) -> None:
    n_images = n_videos = 0
    for index, message in enumerate(messages):
        if message.role not in _ROLES:
            raise DataError("unknown_role",
                            f"messages[{index}] has role {message.role!r}; expected one of "
                            f"{list(_ROLES)}")
        tags = _TAG_PATTERN.findall(message.content)
        if tags and message.role not in _MEDIA_ROLES:
            raise DataError("invalid_record",
                            f"messages[{index}] ({message.role}) contains {tags[0]}; media tags "
                            f"belong in user turns")
        n_images += tags.count(IMAGE_TAG)
        n_videos += tags.count(VIDEO_TAG)
    if n_images != len(image_grids) or n_videos != len(video_frames):
        raise DataError("tag_count_mismatch",
                        f"{n_images} {IMAGE_TAG} and {n_videos} {VIDEO_TAG} tag(s) in the "
                        f"conversation but {len(image_grids)} image(s) and {len(video_frames)} "
                        f"video(s)")


def _checked_grid(grid: Grid) -> Grid:
    cols, rows = grid
    if not (isinstance(cols, int) and isinstance(rows, int)) or cols < 1 or rows < 1:
        raise ValueError(f"an image grid is (cols, rows) with both >= 1, got {grid!r}")
    return cols, rows
