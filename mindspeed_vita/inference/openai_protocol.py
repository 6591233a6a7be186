"""The OpenAI chat-completions wire format: request parsing and response objects.

`parse_chat_request` validates a request body and turns it into a `ChatRequest` (a `Sample`
our renderer takes, the sampling settings and the limits that apply), raising `RequestError`
with an HTTP status and a message naming the offending field, in OpenAI's error shape.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mindspeed_vita.config.schema import InferenceConfig
from mindspeed_vita.data.types import Message, Sample
from mindspeed_vita.inference.media import MediaError, MediaResolver

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_IMAGE_PARTS = ("image_url", "input_image")
_VIDEO_PARTS = ("video_url", "input_video")


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status, the message names the field."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> Dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}


@dataclass
class ChatRequest:
    """A validated request, ready for the engine."""

    sample: Sample
    max_tokens: int
    greedy: bool
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    media: Optional[MediaResolver] = None


def _number(body: dict, key: str, lo: float, hi: float, default):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{key}' must be a number, got {type(value).__name__}", key)
    if not lo <= value <= hi:
        raise RequestError(400, f"'{key}' must be in [{lo}, {hi}], got {value}", key)
    return value


def _content_text(content: Any, where: str, resolver: MediaResolver, images: List[str],
                  videos: List[str], limits: InferenceConfig) -> str:
    """The message text with one <image>/<video> tag line per media part, in order."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise RequestError(400, f"{where} must be a string or a list of content parts", where)
    pieces: List[str] = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(400, f"{at} must be an object with a 'type'", at)
        kind = part["type"]
        if kind in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(400, f"{at}.text must be a string", at)
            pieces.append(text)
        elif kind in _IMAGE_PARTS or kind in _VIDEO_PARTS:
            is_image = kind in _IMAGE_PARTS
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            try:
                path = resolver.resolve(url, f"{at}.{kind}")
            except MediaError as error:
                raise RequestError(400, str(error), f"{at}.{kind}") from None
            (images if is_image else videos).append(path)
            if len(images) > limits.max_images:
                raise RequestError(400, f"the request has more than {limits.max_images} images "
                                        f"(inference.max_images)", at)
            if len(videos) > limits.max_videos:
                raise RequestError(400, f"the request has more than {limits.max_videos} videos "
                                        f"(inference.max_videos)", at)
            pieces.append("<image>" if is_image else "<video>")
        else:
            raise RequestError(400, f"{at}: unsupported content part type {kind!r} (supported: "
                                    f"text, image_url, video_url)", at)
    return "\n".join(pieces)


def parse_chat_request(body: Any, limits: InferenceConfig) -> ChatRequest:
    """Validate a /v1/chat/completions body; RequestError (4xx) names what is wrong.

    Sampling settings a request leaves out come from `limits` (the `inference` config: greedy
    or temperature / top_p); `max_tokens` defaults to, and may not exceed,
    `inference.max_new_tokens`."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise RequestError(400, "'n' must be 1: one completion per request", "n")
    for key in ("tools", "functions", "response_format", "logit_bias"):
        if body.get(key):
            raise RequestError(400, f"'{key}' is not supported by this server", key)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    resolver = MediaResolver(limits.allow_local_media)
    try:
        images: List[str] = []
        videos: List[str] = []
        turns: List[Message] = []
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict):
                raise RequestError(400, f"{where} must be an object", where)
            role = _ROLES.get(msg.get("role"))
            if role is None:
                raise RequestError(400, f"{where}.role must be one of system, user, assistant; "
                                        f"got {msg.get('role')!r}", f"{where}.role")
            text = _content_text(msg.get("content"), f"{where}.content", resolver, images,
                                 videos, limits)
            turns.append(Message(role, text))
        if turns[-1].role != "user":
            raise RequestError(400, "the last message must come from the user", "messages")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and isinstance(max_tokens, int) \
                and max_tokens > limits.max_new_tokens:
            raise RequestError(400, f"'max_tokens' = {max_tokens} is over this server's limit of "
                                    f"{limits.max_new_tokens} (inference.max_new_tokens)",
                               "max_tokens")
        max_tokens = int(_number({"max_tokens": max_tokens}, "max_tokens", 1,
                                 limits.max_new_tokens, limits.max_new_tokens))
        temperature = _number(body, "temperature", 0.0, 100.0, None)
        top_p = float(_number(body, "top_p", 1e-6, 1.0, limits.top_p))
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, "'seed' must be an integer", "seed")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
                or len(stop) > 4:
            raise RequestError(400, "'stop' must be a non-empty string or a list of at most 4",
                               "stop")
        stream_options = body.get("stream_options") or {}
        if temperature is None:
            greedy, temperature = limits.greedy, limits.temperature
        else:
            greedy, temperature = temperature == 0, float(temperature) or 1.0
        return ChatRequest(
            sample=Sample(source="request", line=1, messages=turns, images=images, videos=videos,
                          path="<request>"),
            max_tokens=max_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
            seed=seed, stop=stop, stream=bool(body.get("stream", False)),
            include_usage=bool(stream_options.get("include_usage", False)),
            model=str(body.get("model") or ""), media=resolver)
    except BaseException:
        resolver.close()
        raise


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> Dict[str, Any]:
    """A non-streamed chat.completion object."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, model: str, delta: Dict[str, Any], finish_reason: Optional[str] = None,
               usage_counts: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """One chat.completion.chunk of a streamed answer."""
    choices = [] if usage_counts is not None and not delta else [
        {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": choices}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body
