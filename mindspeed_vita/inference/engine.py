"""Generation: render the request, prefill once, decode (one process, TP and/or CP).

request (text, images, videos) --render--> token ids + pixels --prefill--> KV cache + logits of
the predicting row only --> choose a token --> decode: one new row per step against the cache
--> stop at `<|im_end|>` / end-of-text or the token budget. Under context parallelism the
prompt is zigzag-sharded and prefilled with ring attention, each rank keeps the keys of its
slices and every step merges all shards (`inference.decoding`, `models.cached_attention`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.render import render_sample
from mindspeed_vita.data.types import Message, Sample
from mindspeed_vita.errors import UserInputError
from mindspeed_vita.inference.decoding import DECODE_MODES, make_decoding
from mindspeed_vita.inference.sampling import SamplingParams, choose_next_token


@dataclass
class GenerationResult:
    """What `generate` returns (and `infer --json` prints)."""

    text: str
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    prompt_tokens: int = 0
    stop_reason: str = "length"  # "stop_token" | "length"


def _check_tags(prompt: str, tag: str, flag: str, paths: Sequence[str]) -> int:
    """How many `tag` lines to put in front of the prompt: all of them when the prompt has no
    tag, none when it has one per file; UserInputError when it has some but not that many."""
    count = prompt.count(tag)
    if count == 0:
        return len(paths)
    if count != len(paths):
        raise UserInputError(
            f"--prompt has {count} {tag} tag(s) but {len(paths)} {flag} file(s) were given: "
            f"write one {tag} tag per {flag} file, in order (or no tag at all, and each file "
            f"goes on its own line before the text)")
    return 0


def build_request(prompt: str, images: Sequence[str] = (), videos: Sequence[str] = ()) -> Sample:
    """A one-turn user request. With no `<image>` / `<video>` tag in the prompt, each image /
    video gets a tag line in front of the text (InternVL's convention); otherwise the prompt
    must have exactly one tag per file (UserInputError naming both counts)."""
    prefix = ("<video>\n" * _check_tags(prompt, "<video>", "--video", videos)
              + "<image>\n" * _check_tags(prompt, "<image>", "--image", images))
    return Sample(source="request", line=1, messages=[Message("user", prefix + prompt)],
                  images=list(images), videos=list(videos), path="<prompt>")


def visual_token_ids(tokenizer) -> FrozenSet[int]:
    """Ids a model must never generate: visual context tokens and the tags around them
    (fed back, a context token would ask for visual features that do not exist)."""
    ids = set(tokenizer.context_token_ids)
    ids.update(getattr(tokenizer, name) for name in (
        "img_start_id", "img_end_id", "patch_start_id", "patch_end_id", "vid_start_id",
        "vid_end_id"))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tag] for tag in ("<image>", "<video>") if tag in vocab)
    return frozenset(int(i) for i in ids)


def agree_on_step(tokens: torch.Tensor, stop: bool, groups) -> Tuple[torch.Tensor, bool]:
    """The chosen tokens `[b]` and stop decision of the first rank of this model-parallel block
    (CP rank 0 of TP rank 0) on every rank of the block: a broadcast of b + 1 ints over the CP
    group, then over the TP group (nothing on one process). Every rank computes the same
    logits, but only the driving rank knows the request's stop strings, deadline and client.
    Data-parallel replicas stay independent (an evaluation shards its requests over them)."""
    if groups is None or (groups.cp_size == 1 and groups.tp_size == 1):
        return tokens, stop
    packed = torch.cat([tokens.long(), torch.tensor([int(stop)], device=tokens.device)])
    for size, group, ranks in ((groups.cp_size, groups.cp, groups.cp_ranks),
                               (groups.tp_size, groups.tp, groups.tp_ranks)):
        if size > 1:
            dist.broadcast(packed, src=ranks[0], group=group)
    return packed[:-1], bool(packed[-1])


class Generator:
    """Generates from a `LongVitaModel`: one process, tensor parallel and/or context parallel
    (every rank of the world calls in step, with the same request)."""

    def __init__(self, model, tokenizer, *, max_num_frame: int = 64,
                 system_prompt: Optional[str] = None, decode_mode: str = "kv-cache"):
        if decode_mode not in DECODE_MODES:
            raise UserInputError(f"--decode-mode {decode_mode!r}: choose one of "
                                 f"{', '.join(DECODE_MODES)}")
        self.decode_mode = decode_mode
        self.model = model
        self.tokenizer = tokenizer
        self.max_num_frame = max_num_frame
        self.system_prompt = system_prompt
        #: `<|im_end|>`, the tokenizer's eos and `<|endoftext|>` (what an exported
        #: generation_config.json lists as eos_token_id)
        self.stop_ids = set(tokenizer.stop_token_ids)
        #: masked to -inf before every choice, so generation never emits a visual token
        self.banned_ids = torch.tensor(sorted(visual_token_ids(tokenizer)), dtype=torch.long,
                                       device=model.backend.device())

    def render(self, request: Sample):
        """Token ids `[1, s]` and pixel tensor of a request, with the generation prompt.

        A missing or undecodable image or video is a UserInputError naming the file."""
        try:
            rendered = render_sample(request, self.tokenizer, model_cfg=self.model.cfg,
                                     max_num_frame=self.max_num_frame,
                                     add_generation_prompt=True, system_prompt=self.system_prompt)
        except DataError as error:
            # the detail names the media file ("x.png: cannot decode image (...)"); the
            # request's own address ("<prompt>:1") says nothing to a command-line user
            raise UserInputError(error.detail) from None
        return rendered.input_ids[None], rendered.pixel_values

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                     max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                     seed: int = 0, on_token: Optional[Callable[[int], bool]] = None
                     ) -> GenerationResult:
        """Generate from ready token ids `[1, s]` (+ pixels); see `generate`.

        `on_token(token_id)` is called after each chosen token; returning True ends the
        generation there (stop strings, timeouts, a client that went away). In a model split
        over ranks (CP / TP) every rank of it calls this in step; the tokens and the stop
        decision of its first rank are broadcast, so all ranks feed the same tokens and stop
        together (`on_token` matters on that rank: rank 0 of a server)."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate_ids takes one request [1, s], got "
                             f"{tuple(input_ids.shape)}: use generate_batch")
        return self.generate_batch(input_ids, pixel_values, max_new_tokens, sampling, seed,
                                   on_token=on_token)[0]

    @torch.no_grad()
    def generate_batch(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                       max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                       seed: int = 0, on_token: Optional[Callable[[int], bool]] = None
                       ) -> List[GenerationResult]:
        """Generate for `b` prompts of one length, `input_ids [b, s]` (pixels of all rows in
        row order), until every row has emitted a stop token or `max_new_tokens`.

        The prompt is prefilled once (zigzag-sharded over the CP group with ring attention
        under CP), then decoded one token per step against the KV cache (`decode_mode`
        "kv-cache"), or re-run at a fixed padded length per token ("fixed-length").
        `on_token` (b = 1 only): see `generate_ids`."""
        model = self.model
        device = model.backend.device()
        b, prompt_len = input_ids.shape
        if on_token is not None and b != 1:
            raise ValueError("on_token takes one request (b = 1)")
        if pixel_values is not None and pixel_values.numel() == 0:
            pixel_values = None
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        decoding = make_decoding(self.decode_mode, model, input_ids, pixel_values,
                                 max_new_tokens)
        generator = torch.Generator(device=device).manual_seed(seed)
        results = [GenerationResult(text="", prompt_tokens=prompt_len) for _ in range(b)]
        done = [False] * b
        logits = decoding.prefill()
        for step in range(max_new_tokens):
            token, logprob = choose_next_token(logits, sampling, generator,
                                               banned_ids=self.banned_ids)
            stop = False
            if on_token is not None and int(token[0]) not in self.stop_ids:
                stop = bool(on_token(int(token[0])))
            token, stop = agree_on_step(token, stop, getattr(model, "groups", None))
            for row in range(b):
                if done[row]:
                    continue
                token_id = int(token[row])
                results[row].token_ids.append(token_id)
                results[row].logprobs.append(float(logprob[row]))
                if token_id in self.stop_ids:
                    results[row].stop_reason = "stop_token"
                    done[row] = True
                elif stop:
                    results[row].stop_reason = "stopped"
                    done[row] = True
            if all(done) or step + 1 == max_new_tokens:
                break
            logits = decoding.step(token.to(device), prompt_len + step)
        for result in results:
            shown = [t for t in result.token_ids if t not in self.stop_ids]
            result.text = self.tokenizer.decode(shown, skip_special_tokens=True)
        return results

    def generate(self, prompt: str, images: Sequence[str] = (), videos: Sequence[str] = (), *,
                 max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
                 seed: int = 0) -> GenerationResult:
        """Render the request, prefill it into a fresh KV cache and decode token by token."""
        input_ids, pixels = self.render(build_request(prompt, images, videos))
        return self.generate_ids(input_ids, pixels, max_new_tokens, sampling, seed)
