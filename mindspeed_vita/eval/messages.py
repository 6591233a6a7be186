"""lmms-eval chat messages -> a mindspeed-vita request (`Sample`), media written to files.

lmms-eval hands a chat model `[{"role", "content": [{"type": "text"|"image"|"video", ...}]}]`;
images are PIL images (or paths), videos paths. Each image / video part becomes an `<image>` /
`<video>` tag at its place in the turn's text (tag and text parts are joined with "\n", as
the InternVL-style prompt our `infer` builds puts each tag on its own line); PIL images are
saved losslessly (PNG) into `media_dir` so the renderer reads exactly their pixels.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from mindspeed_vita.data.types import Message, Sample
from mindspeed_vita.errors import UserInputError

_ROLES = ("system", "user", "assistant")


def _field(part: Any, name: str):
    return part.get(name) if isinstance(part, dict) else getattr(part, name, None)


def _media_path(url: Any, media_dir: str, index: int) -> str:
    if isinstance(url, str):
        if not os.path.exists(url):
            raise UserInputError(f"media file {url!r} does not exist")
        return url
    if hasattr(url, "save") and hasattr(url, "convert"):  # a PIL image
        path = os.path.join(media_dir, f"image_{index:05d}.png")
        url.convert("RGB").save(path, format="PNG")
        return path
    raise UserInputError(f"unsupported media object {type(url).__name__} (expected a PIL image "
                         f"or a file path)")


def chat_to_sample(messages: Sequence[Any], media_dir: str, *, name: str = "lmms-eval"
                   ) -> Sample:
    """One conversation (lmms-eval's `doc_to_messages` output: dicts or its pydantic
    messages) as a `Sample` whose media are files; audio parts are refused."""
    turns: List[Message] = []
    images: List[str] = []
    videos: List[str] = []
    for number, message in enumerate(messages):
        role = _field(message, "role")
        if role not in _ROLES:
            raise UserInputError(f"messages[{number}]: role {role!r} is not one of {_ROLES}")
        content = _field(message, "content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        pieces: List[str] = []
        for part in content or []:
            kind = _field(part, "type")
            if kind == "text":
                pieces.append(_field(part, "text") or "")
            elif kind == "image":
                images.append(_media_path(_field(part, "url"), media_dir, len(images)))
                pieces.append("<image>")
            elif kind == "video":
                videos.append(_media_path(_field(part, "url"), media_dir, len(videos)))
                pieces.append("<video>")
            else:
                raise UserInputError(f"messages[{number}]: content type {kind!r} is not "
                                     f"supported (text, image, video)")
        turns.append(Message(role=role, content="\n".join(p for p in pieces if p != "")))
    if not turns:
        raise UserInputError("an evaluation request has no messages")
    return Sample(source=name, line=1, messages=turns, images=images, videos=videos,
                  path=f"<{name}>")


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def user_turn(visuals: Any, text: str) -> List[Dict[str, Any]]:
    """The one-turn conversation of a "simple" lmms-eval request: the visuals of
    `doc_to_visual` (PIL images, image or video paths, `{"type", "url"|"path"}` dicts; a
    list, possibly nested once, or None for a text-only task) in order, then `text`."""
    flat: List[Any] = []
    for visual in ([] if visuals is None else
                   visuals if isinstance(visuals, (list, tuple)) else [visuals]):
        flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
    content: List[Dict[str, Any]] = []
    for visual in flat:
        if isinstance(visual, dict):
            content.append({"type": visual.get("type", "video"),
                            "url": visual.get("url") or visual.get("path")})
        elif isinstance(visual, str):
            kind = "image" if visual.lower().endswith(_IMAGE_SUFFIXES) else "video"
            content.append({"type": kind, "url": visual})
        else:  # a PIL image (anything else is refused by chat_to_sample, naming its type)
            content.append({"type": "image", "url": visual})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def sampling_from_gen_kwargs(gen_kwargs: Dict[str, Any], default_max_new_tokens: int):
    """`(max_new_tokens, SamplingParams, stop strings)` from lmms-eval's generation kwargs
    (temperature 0 or absent: greedy; `until`: stop strings)."""
    from mindspeed_vita.inference.sampling import SamplingParams

    max_new = int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    top_p = gen_kwargs.get("top_p")
    sampling = (SamplingParams(greedy=True) if temperature <= 0 else
                SamplingParams(greedy=False, temperature=temperature,
                               top_p=float(top_p) if top_p else 1.0))
    until = gen_kwargs.get("until") or []
    stops = [until] if isinstance(until, str) else [s for s in until if s]
    return max_new, sampling, stops


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]
