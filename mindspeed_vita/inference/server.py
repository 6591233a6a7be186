"""OpenAI-compatible HTTP server on FastAPI: /v1/chat/completions, /v1/models, /health.

Handlers validate a request (`openai_protocol`), hand it to the `GenerationService` (one
request at a time on the model) and answer with one JSON object or, with `stream: true`,
server-sent events (`data: {chunk}` lines, then `data: [DONE]`). Every refusal is a 4xx with
OpenAI's error object and a message naming the field; the server keeps serving afterwards.
"""
from __future__ import annotations

import json
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mindspeed_vita.inference.openai_protocol import (RequestError, chunk_body, completion_body,
                                                      completion_id, parse_chat_request, usage)
from mindspeed_vita.inference.service import GenerationService, Job


def _error(status: int, message: str, param=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(RequestError(status, message, param, kind).body(), status_code=status)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def create_app(service: GenerationService, *, model_name: str) -> FastAPI:
    """The FastAPI application serving `service` under the model id `model_name`."""
    app = FastAPI(title="mindspeed-vita", docs_url=None, redoc_url=None)
    limits = service.limits
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def _request_error(_, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "mindspeed-vita"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            return _error(413, f"the request has {declared} bytes, more than the limit of "
                               f"{limits.max_request_bytes} (inference.max_request_bytes)")
        raw = await request.body()
        if len(raw) > limits.max_request_bytes:
            return _error(413, f"the request has {len(raw)} bytes, more than the limit of "
                               f"{limits.max_request_bytes} (inference.max_request_bytes)")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return _error(400, f"the request body is not valid JSON: {error}")
        chat = parse_chat_request(body, limits)
        job = service.submit(chat)
        first = await job.next_event()
        if first[0] == "error":
            return _error(first[1], first[2])
        cid = completion_id()
        if not chat.stream:
            while True:
                event = await job.next_event()
                if event[0] == "error":
                    return _error(event[1], event[2])
                if event[0] == "done":
                    _, text, finish, prompt_tokens, completion_tokens = event
                    return completion_body(cid, model_name, text, finish, prompt_tokens,
                                           completion_tokens)
        return StreamingResponse(_stream(job, cid, model_name, chat.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


async def _stream(job: Job, cid: str, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        yield _sse(chunk_body(cid, model, {"role": "assistant", "content": ""}))
        while True:
            event = await job.next_event()
            if event[0] == "delta":
                yield _sse(chunk_body(cid, model, {"content": event[1]}))
            elif event[0] == "error":
                yield _sse(RequestError(event[1], event[2]).body())
                break
            elif event[0] == "done":
                _, _, finish, prompt_tokens, completion_tokens = event
                yield _sse(chunk_body(cid, model, {}, finish))
                if include_usage:
                    yield _sse(chunk_body(cid, model, {}, None,
                                          usage(prompt_tokens, completion_tokens)))
                break
        yield b"data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops its generation at the next token
