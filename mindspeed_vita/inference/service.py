"""Serving requests one at a time on the model: a queue, one worker thread, events per request.

HTTP handlers (asyncio) `submit` a validated `ChatRequest` and read its events; the single
worker thread renders, checks the limits and generates, so requests never mix and the model
and tokenizer are only touched by one thread. Events: ("start", prompt_tokens), ("delta",
text), ("done", text, finish_reason, prompt_tokens, completion_tokens) or
("error", status, message). A request still queued past its deadline, or generating past it,
ends with a 504; a client that disconnects ends its generation at the next token.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from mindspeed_vita.errors import UserInputError
from mindspeed_vita.config.schema import InferenceConfig
from mindspeed_vita.inference.openai_protocol import ChatRequest
from mindspeed_vita.inference.sampling import SamplingParams
from mindspeed_vita.inference.text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request in flight: its events go to the handler's event loop."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next_event(self):
        return await self.events.get()


class GenerationService:
    """Owns the model's generator and the worker thread that runs requests in order.

    `generate` defaults to `generator.generate_ids`; a multi-rank server passes a function that
    also drives the other ranks (same signature).
    """

    def __init__(self, generator, limits: InferenceConfig, *,
                 generate: Optional[Callable] = None):
        self.generator = generator
        self.limits = limits
        self._generate = generate or generator.generate_ids
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()

    def submit(self, request: ChatRequest) -> Job:
        """Queue a request; its events arrive on the calling event loop."""
        job = Job(request, asyncio.get_running_loop(),
                  time.monotonic() + self.limits.request_timeout)
        self._queue.put(job)
        return job

    def close(self) -> None:
        """Finish the running request and stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    # ---------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._serve(job)
            except UserInputError as error:
                job.emit("error", 400, str(error))
            except Exception as error:  # a bug: answer 500 and keep serving
                log.exception("request failed")
                job.emit("error", 500, f"internal error: {type(error).__name__}: {error}")
            finally:
                if job.request.media is not None:
                    job.request.media.close()

    def _timeout_message(self) -> str:
        return (f"the request did not finish within {self.limits.request_timeout:g} s "
                f"(inference.request_timeout)")

    def _serve(self, job: Job) -> None:
        req = job.request
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.emit("error", 504, self._timeout_message())
            return
        input_ids, pixels = self.generator.render(req.sample)
        prompt_tokens = int(input_ids.shape[1])
        if prompt_tokens > self.limits.max_prompt_tokens:
            job.emit("error", 400, f"the prompt has {prompt_tokens} tokens, more than the limit "
                                   f"of {self.limits.max_prompt_tokens} "
                                   f"(inference.max_prompt_tokens)")
            return
        job.emit("start", prompt_tokens)
        stream = TextStream(self.generator.tokenizer, self.generator.stop_ids, req.stop)
        timed_out = False

        def on_token(token_id: int) -> bool:
            nonlocal timed_out
            delta, hit = stream.push(token_id)
            if delta:
                job.emit("delta", delta)
            if time.monotonic() > job.deadline:
                timed_out = True
            return hit or timed_out or job.cancelled.is_set()

        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        sampling = SamplingParams(greedy=req.greedy, temperature=req.temperature, top_p=req.top_p)
        result = self._generate(input_ids, pixels, req.max_tokens, sampling, seed,
                                on_token=on_token)
        if timed_out and not stream.hit_stop:
            job.emit("error", 504, self._timeout_message())
            return
        if result.stop_reason in ("stop_token", "length") and result.token_ids:
            # the last token (a stop token, or the one that hit the budget) was not pushed
            last = result.token_ids[-1]
            if len(stream.ids) < len(result.token_ids):
                delta, _ = stream.push(last)
                if delta:
                    job.emit("delta", delta)
        rest = stream.finish()
        if rest:
            job.emit("delta", rest)
        finish = "stop" if (stream.hit_stop or result.stop_reason == "stop_token") else "length"
        job.emit("done", stream.text, finish, prompt_tokens, len(result.token_ids))
