"""Single-process generation with a KV cache: render the request, prefill once, decode.

request (text, images, videos) --render--> token ids + pixels --prefill--> KV cache + logits of
the last row only --> choose a token --> decode: one new row per step against the cache -->
stop at `<|im_end|>` / end-of-text or the token budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, FrozenSet, List, Optional, Sequence

import torch

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.render import render_sample
from mindspeed_vita.data.types import Message, Sample
from mindspeed_vita.errors import UserInputError
from mindspeed_vita.inference.kv_cache import KVCache
from mindspeed_vita.inference.sampling import SamplingParams, choose_next_token
from mindspeed_vita.models.inputs import batch_from_tensors


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


def _cached_forward(model, decoder_input: torch.Tensor, position_ids: torch.Tensor,
                    cache: KVCache) -> torch.Tensor:
    """Decoder + final norm for this step's rows, reading and extending the KV cache."""
    params = model.language.rotary_params(position_ids)
    params.kv_cache = cache
    hidden = model.language.decoder(decoder_input, attention_mask=None, packed_seq_params=params)
    cache.advance()
    return hidden


def visual_token_ids(tokenizer) -> FrozenSet[int]:
    """Ids a model must never generate: visual context tokens and the tags around them
    (fed back, a context token would ask for visual features that do not exist)."""
    ids = set(tokenizer.context_token_ids)
    ids.update(getattr(tokenizer, name) for name in (
        "img_start_id", "img_end_id", "patch_start_id", "patch_end_id", "vid_start_id",
        "vid_end_id"))
    vocab = tokenizer.hf.get_vocab()
    ids.update(vocab[tag] for tag in ("<image>", "<video>") if tag in vocab)
    return frozenset(int(i) for i in ids)


def _embed(model, input_ids: torch.Tensor, positions: torch.Tensor,
           pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embeddings (visual rows included) of this step's tokens through the model's inputs seam."""
    batch = batch_from_tensors(input_ids, positions, pixel_values)
    return model.embed(model.build_inputs(batch, with_labels=False))


class Generator:
    """Generates from a `LongVitaModel` (tp=1 or tp>1 with every rank calling in step)."""

    def __init__(self, model, tokenizer, *, max_num_frame: int = 64,
                 system_prompt: Optional[str] = None):
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
        generation there (stop strings, timeouts, a client that went away)."""
        model = self.model
        device = model.backend.device()
        input_ids = input_ids.to(device)
        if pixel_values is not None and pixel_values.numel() == 0:
            pixel_values = None
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        prompt_len = input_ids.shape[1]
        cache = KVCache(model.cfg.language.num_layers, prompt_len + max_new_tokens)
        generator = torch.Generator(device=device).manual_seed(seed)
        positions = torch.arange(prompt_len, device=device)[None]
        hidden = _cached_forward(model, _embed(model, input_ids, positions, pixel_values),
                                 positions, cache)
        result = GenerationResult(text="", prompt_tokens=prompt_len)
        for step in range(max_new_tokens):
            logits = model.last_logits(hidden)
            token, logprob = choose_next_token(logits, sampling, generator,
                                               banned_ids=self.banned_ids)
            token_id = int(token[0])
            result.token_ids.append(token_id)
            result.logprobs.append(float(logprob[0]))
            if token_id in self.stop_ids:
                result.stop_reason = "stop_token"
                break
            if on_token is not None and on_token(token_id):
                result.stop_reason = "stopped"
                break
            if step + 1 == max_new_tokens:
                break
            new = token.view(1, 1)
            pos = torch.full((1, 1), prompt_len + step, device=device, dtype=torch.long)
            hidden = _cached_forward(model, _embed(model, new, pos), pos, cache)
        shown = [t for t in result.token_ids if t not in self.stop_ids]
        result.text = self.tokenizer.decode(shown, skip_special_tokens=True)
        return result

    def generate(self, prompt: str, images: Sequence[str] = (), videos: Sequence[str] = (), *,
                 max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
                 seed: int = 0) -> GenerationResult:
        """Render the request, prefill it into a fresh KV cache and decode token by token."""
        input_ids, pixels = self.render(build_request(prompt, images, videos))
        return self.generate_ids(input_ids, pixels, max_new_tokens, sampling, seed)
