"""Choosing the next token: greedy, or temperature + nucleus (top-p) sampling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from mindspeed_vita.errors import UserInputError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `greedy` ignores temperature and top_p."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise UserInputError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"--top-p must be in (0, 1], got {self.top_p}")


def choose_next_token(logits: torch.Tensor, params: SamplingParams,
                      generator: Optional[torch.Generator] = None,
                      banned_ids: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of `logits [b, vocab]`, never one of `banned_ids`.

    Returns `(token_ids [b], logprobs [b])` where logprobs is the log-probability of the chosen
    token under the model's own distribution (log_softmax of the raw logits, fp32), whatever
    the sampling settings and bans.
    """
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    if banned_ids is not None and banned_ids.numel():
        logits = logits.index_fill(-1, banned_ids, float("-inf"))
    if params.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always stays)
            keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        tokens = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1,
                                   generator=generator).squeeze(-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
