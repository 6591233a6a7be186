"""JSONL record -> validated `Sample`.

Accepted record (one JSON object per line)::

    {"messages": [{"role": "user", "content": "<image>\\nWhat is this?"},
                  {"role": "assistant", "content": "A red circle."}],
     "images": ["img/a.png"], "videos": []}

or LLaVA style ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``.
Roles are normalised to system / user / assistant. Media paths are relative to the source root
(absolute paths are kept) and become absolute in the `Sample`. Other keys (ids, metadata) are
ignored. Every rejection raises `DataError` with a reason and the file:line of the record.
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Optional

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.types import Message, Sample

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"

#: accepted role names (either key style) -> normalised role
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


def parse_line(
    text: str, *, source: str, root: str, path: str, line: int, check_files: bool = True
) -> Sample:
    """Parse one JSONL line into a `Sample`; a line that is not JSON raises "invalid_json"."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        detail = f"not a JSON line ({error.msg} at column {error.colno})"
        raise DataError("invalid_json", detail, path=path, line=line) from None
    return parse_record(obj, source=source, root=root, path=path, line=line, check_files=check_files)


def parse_record(
    obj: Any, *, source: str, root: str, path: str, line: int, check_files: bool = True
) -> Sample:
    """Validate one decoded JSON record and return it as a `Sample` with absolute media paths.

    `root` is the media root of the source; `path`/`line` locate the record for error messages.
    With `check_files`, every image must be a file and every video a file or a directory (of
    frames); otherwise "missing_file".
    """

    def reject(reason: str, detail: str) -> DataError:
        return DataError(reason, detail, path=path, line=line)

    if not isinstance(obj, dict):
        raise reject("invalid_record", f"a record must be a JSON object, got {type(obj).__name__}")
    messages = _parse_turns(obj, reject)
    images = _parse_media_list(obj, "images", reject)
    videos = _parse_media_list(obj, "videos", reject)

    for tag, key, paths in ((IMAGE_TAG, "images", images), (VIDEO_TAG, "videos", videos)):
        n_tags = sum(message.content.count(tag) for message in messages)
        if n_tags != len(paths):
            hint = ""
            singular = key[:-1]
            if n_tags and not paths and singular in obj:
                hint = f" (found key {singular!r}; the key is {key!r}, a list)"
            raise reject(
                "tag_count_mismatch",
                f"{n_tags} {tag} tag(s) in the conversation but {len(paths)} entries in {key!r}{hint}",
            )

    images = [_resolve(root, p) for p in images]
    videos = [_resolve(root, p) for p in videos]
    if check_files:
        for index, image in enumerate(images):
            if not os.path.isfile(image):
                raise reject("missing_file", f"images[{index}]: no such file {image}")
        for index, video in enumerate(videos):
            if not os.path.exists(video):
                raise reject("missing_file", f"videos[{index}]: no such file or frame directory {video}")
    return Sample(source=source, line=line, messages=messages, images=images, videos=videos, path=path)


def _parse_turns(obj: dict, reject) -> List[Message]:
    has_messages, has_conversations = "messages" in obj, "conversations" in obj
    if has_messages == has_conversations:
        raise reject(
            "invalid_record",
            "record needs exactly one of 'messages' or 'conversations'"
            + (" (found both)" if has_messages else f" (found keys {sorted(obj)})"),
        )
    key = "messages" if has_messages else "conversations"
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise reject("invalid_record", f"{key!r} must be a non-empty list")

    messages = []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise reject("invalid_record", f"{where} must be an object, got {type(turn).__name__}")
        # a turn uses one key style: role/content (OpenAI) or from/value (LLaVA)
        if "role" in turn or "content" in turn:
            role_key, content_key = "role", "content"
        else:
            role_key, content_key = "from", "value"
        if role_key not in turn or content_key not in turn:
            raise reject("invalid_record", f"{where} needs keys 'role'/'content' or 'from'/'value', got {sorted(turn)}")
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str):
            raise reject("invalid_record", f"{where}.{role_key} must be a string, got {type(role).__name__}")
        if role not in ROLE_NAMES:
            raise reject("unknown_role", f"{where}.{role_key} is {role!r}; expected one of {sorted(ROLE_NAMES)}")
        if not isinstance(content, str):
            raise reject("invalid_record", f"{where}.{content_key} must be a string, got {type(content).__name__}")
        normalised = ROLE_NAMES[role]
        if normalised == "system" and index != 0:
            raise reject("invalid_record", f"{where}: a system turn may only be the first turn")
        messages.append(Message(role=normalised, content=content))

    if not any(message.role == "assistant" for message in messages):
        raise reject("invalid_record", f"{key!r} has no assistant turn, so nothing to learn from")
    return messages


def _parse_media_list(obj: dict, key: str, reject) -> List[str]:
    value: Optional[Any] = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise reject("invalid_record", f"{key!r} must be a list of paths, got {type(value).__name__}")
    for index, entry in enumerate(value):
        if not isinstance(entry, str) or not entry:
            raise reject("invalid_record", f"{key}[{index}] must be a non-empty string path, got {entry!r}")
    return list(value)


def _resolve(root: str, relative_or_absolute: str) -> str:
    return os.path.abspath(os.path.join(root, relative_or_absolute))
