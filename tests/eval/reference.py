"""Direct scoring with transformers' reference of the tiny Long-VITA checkpoint: what the
log-likelihood of a continuation must be, computed without mindspeed-vita."""
from typing import List, Tuple

import torch

from tests.tiny_long_vita import RELEASE_TOKENS


def reference_score(model, ids: torch.Tensor, pixels: torch.Tensor, token_ids: dict,
                    continuation_ids: List[int]) -> Tuple[float, bool]:
    """`(sum of log-probs, is_greedy)` of `continuation_ids` after the prompt `ids [1, s]`
    (from `release_inputs`), by one full forward of `internvl_reference`: the log-softmax of
    the rows that predict the continuation, and whether each continuation token is the argmax
    with the visual tokens banned (as generation bans them)."""
    full = torch.cat([ids, torch.tensor([continuation_ids])], dim=1)
    hf_ids = full.clone()
    hf_ids[hf_ids == token_ids["<PATCH_CONTEXT>"]] = token_ids["<IMG_CONTEXT>"]
    with torch.no_grad():
        logits = model(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                       pixel_values=pixels).logits[0].float()
    rows = logits[ids.shape[1] - 1: full.shape[1] - 1]  # the rows that predict the continuation
    target = torch.tensor(continuation_ids)
    logprob = float(torch.log_softmax(rows, -1).gather(-1, target[:, None]).sum())
    banned = [token_ids[t] for t in RELEASE_TOKENS[:9] + ["<image>", "<video>"]]
    rows[:, banned] = float("-inf")
    return logprob, bool((rows.argmax(-1) == target).all())
