"""Held-out accuracy of the demo model on colour / shape / count questions about synthetic images.

Each question is multiple choice, scored by likelihood: the model reads the image and the
question, and the candidate answer with the lowest summed negative log-likelihood is its
choice. Questions come from the held-out images of `data.synth` (never trained on), with the
truth parsed from their held-out captions:

* colour: "What colour is the <kind>, and how big is it?" -> "The <kind> is <colour>." over
  every colour (asked only when one shape of that kind is in the picture);
* shape: "Which shape is closest to the top edge of the image?" -> "The <colour> <kind> is
  closest to the top edge" over the three kinds (the colour is the true one);
* count: "How many shapes can you see, and what are they?" -> "I can see <n> shape(s):" for
  n = 1, 2, 3.
Chance is 1 / number of candidates.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from mindspeed_vita.data.synth import AT, COLOURS, POSITIONS, SHAPES
from mindspeed_vita.data.types import IGNORE_INDEX

_COUNT = re.compile(r"It contains (\d+) shape")
_SHAPE = re.compile(r"A (small|medium|large) (\w+) (circle|square|triangle) sits ([^.]+)\.")
_POSITION_OF = {phrase: name for name, phrase in AT.items()}


@dataclass
class Question:
    """One multiple-choice question about one image."""

    kind: str  # colour | shape | count
    image: str
    prompt: str
    candidates: List[str]
    answer: int


def heldout_questions(data_dir: str) -> List[Question]:
    """The questions of every held-out synthetic image under `data_dir`."""
    questions = []
    with open(os.path.join(data_dir, "image_caption_heldout.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for record in records:
        image = os.path.join(data_dir, record["images"][0])
        caption = record["messages"][1]["content"]
        count = int(_COUNT.search(caption).group(1))
        shapes = [(colour, kind, _POSITION_OF[at]) for _, colour, kind, at in
                  _SHAPE.findall(caption)]
        counts = [f"I can see {n} shape{'s' if n > 1 else ''}:" for n in (1, 2, 3)]
        questions.append(Question("count", image, "How many shapes can you see, and what are "
                                  "they?", counts, count - 1))
        top = min(shapes, key=lambda s: (POSITIONS[s[2]][1], POSITIONS[s[2]][0]))
        questions.append(Question(
            "shape", image, "Which shape is closest to the top edge of the image?",
            [f"The {top[0]} {k} is closest to the top edge" for k in SHAPES],
            SHAPES.index(top[1])))
        kinds = [s[1] for s in shapes]
        for colour, kind, _ in shapes:
            if kinds.count(kind) == 1:
                colours = sorted(COLOURS)
                questions.append(Question(
                    "colour", image, f"What colour is the {kind}, and how big is it?",
                    [f"The {kind} is {c}." for c in colours], colours.index(colour)))
                break
    return questions


def chance(questions: Sequence[Question]) -> Dict[str, float]:
    """Expected accuracy of guessing, per question kind."""
    by_kind = defaultdict(list)
    for q in questions:
        by_kind[q.kind].append(1.0 / len(q.candidates))
    return {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}


def answer_only_labels(labels: torch.Tensor, im_end_id: int) -> torch.Tensor:
    """`labels` with the assistant turn's closing `<|im_end|>` and what follows it ignored.

    A candidate is the opening of a longer training answer ("The circle is red." before "It is
    large ..."), so the turn's end after it is equally unlikely for every candidate; scoring it
    would only add noise to the comparison of the candidates' own tokens."""
    labels = labels.clone()
    ends = (labels == im_end_id).nonzero().flatten()
    if ends.numel():
        labels[int(ends[-1]):] = IGNORE_INDEX
    return labels


@torch.no_grad()
def answer_nll(model, tokenizer, model_cfg, image: str, prompt: str, answer: str,
               max_num_frame: int = 8) -> float:
    """Summed negative log-likelihood of `answer` after the image and `prompt`."""
    from mindspeed_vita.data.render import render_sample
    from mindspeed_vita.data.types import Message, Sample
    from mindspeed_vita.models.inputs import batch_from_tensors

    sample = Sample(source="heldout", line=0, images=[image],
                    messages=[Message("user", f"<image>\n{prompt}"),
                              Message("assistant", answer)])
    rendered = render_sample(sample, tokenizer, model_cfg=model_cfg, max_num_frame=max_num_frame)
    ids = rendered.input_ids[None]
    batch = batch_from_tensors(ids, torch.arange(ids.shape[1])[None], rendered.pixel_values,
                               labels=answer_only_labels(rendered.labels, tokenizer.im_end_id)[None])
    terms = model(model.build_inputs(batch))
    return float(terms.loss_sum)


def accuracy(model, tokenizer, model_cfg, questions: Sequence[Question]) -> Dict[str, float]:
    """Fraction of questions answered right, per kind (and `n` per kind)."""
    right, total = defaultdict(int), defaultdict(int)
    model.eval()
    for q in questions:
        scores = [answer_nll(model, tokenizer, model_cfg, q.image, q.prompt, c)
                  for c in q.candidates]
        right[q.kind] += int(min(range(len(scores)), key=scores.__getitem__) == q.answer)
        total[q.kind] += 1
    return {k: right[k] / total[k] for k in sorted(total)}
