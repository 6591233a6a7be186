"""The evaluation engine (`eval.runner.EvalRunner`, no lmms-eval needed): log-likelihood of a
continuation against a direct computation with transformers, and a context-parallel block of
two gloo processes against one process.

The model is the tiny Long-VITA `_HF` checkpoint of `tests/tiny_long_vita.py`; the direct
computation is one full forward of transformers' InternVL with the same weights over the
release's token layout followed by the continuation ids: the sum of the continuation's
log-softmax values, and whether each continuation token is the argmax (visual tokens banned,
as generation bans them).
"""
import os

import pytest
import skimage.data
from PIL import Image

from mindspeed_vita.data.tokenizer import load_tokenizer
from tests.dist_utils import run_distributed
from tests.eval.reference import reference_score
from tests.tiny_long_vita import (internvl_reference, reference_generate, release_inputs,
                                  save_tiny_long_vita)

QUESTION = "What is in the picture?"
GRID = (2, 1)  # the 112 x 56 crop: 2 x 1 tiles + thumbnail


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runner")
    ckpt = str(root / "Long-VITA-tiny_HF")
    state = save_tiny_long_vita(ckpt, seed=0)
    image = str(root / "crop.png")
    Image.fromarray(skimage.data.coffee()).crop((100, 100, 212, 156)).save(image)
    tok = load_tokenizer(ckpt)
    ids, pixels, token_ids = release_inputs(ckpt, QUESTION, image, GRID)
    model = internvl_reference(state, token_ids["<IMG_CONTEXT>"])
    stops = sorted(tok.stop_token_ids)
    greedy_ids, _ = reference_generate(model, ids, pixels, token_ids, stops, 6)
    greedy_ids = [t for t in greedy_ids if t not in stops]
    # this random model's greedy bytes need not tokenize back to themselves, so the greedy
    # case is scored from ids; the text cases go through the tokenizer
    texts = [" a red bicycle", "What is it?"]
    continuations = [greedy_ids] + texts
    expected = [reference_score(model, ids, pixels, token_ids, c if isinstance(c, list)
                                 else tok.encode(c)) for c in continuations]
    assert expected[0][1] and not expected[1][1]  # greedy / not greedy: both cases covered
    return {"root": str(root), "ckpt": ckpt, "image": image, "continuations": continuations,
            "expected": expected,
            "greedy_text": tok.decode(greedy_ids, skip_special_tokens=True)}


def _body(rank, world, ckpt, image, media, items_by_rank, cp=None, tp=1):
    """Score / generate this rank's items with a runner at cp (default: the world) and tp;
    (scores, answers) of this rank's items."""
    from mindspeed_vita.eval.messages import chat_to_sample, user_turn
    from mindspeed_vita.eval.runner import EvalRunner, ScoringJob

    runner = EvalRunner(ckpt, backend="cpu", cp=world if cp is None else cp, tp=tp)
    items = items_by_rank[rank]

    def maker(item):
        def make():
            sample = chat_to_sample(user_turn([image], QUESTION), media)
            if item[0] == "score" and isinstance(item[1], list):  # token ids
                input_ids, pixels = runner.generator.render(sample)
                return ScoringJob(input_ids, pixels, item[1])
            if item[0] == "score":
                return runner.scoring_job(sample, item[1])
            return runner.generation_job(sample, {"max_new_tokens": item[1], "temperature": 0},
                                         256)
        return make

    scores = runner.run([maker(i) for i in items if i[0] == "score"], runner.score)
    answers = runner.run([maker(i) for i in items if i[0] == "generate"], runner.generate)
    return scores, answers


def test_loglikelihood_and_cp2_equal_direct_and_single_process(case):
    conts = case["continuations"]
    score_items = [("score", c) for c in conts]
    one = run_distributed(_body, 1, args=(case["ckpt"], case["image"], case["root"],
                                          [score_items + [("generate", 6)]]))[0]
    scores, answers = one
    for (got, greedy), (want, want_greedy), text in zip(scores, case["expected"], conts):
        assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (text, got, want)
        assert greedy == want_greedy, text
    assert answers == [case["greedy_text"]]
    # cp=2: rank 0 owns two scoring requests, rank 1 one and the generation; every request
    # runs on both ranks, each rank gets back the results of its own
    two = run_distributed(_body, 2, args=(case["ckpt"], case["image"], case["root"],
                                          [score_items[:2], score_items[2:] + [("generate", 6)]]))
    (s0, a0), (s1, a1) = two
    assert a0 == [] and a1 == answers
    for got, want in zip(s0 + s1, scores):
        assert got[1] == want[1]
        assert abs(got[0] - want[0]) < 1e-4 * max(1.0, abs(want[0])), (got, want)
    assert os.path.isdir(case["root"])


def test_tp2_and_two_cp2_replicas_equal_one_process(case):
    """Other layouts of the block: tp=2 (one block of two tensor-parallel ranks) and four
    processes at cp=2 (two data-parallel replicas, each a block of two); every rank owns
    different requests and gets back exactly the one-process results of its own."""
    questions = [("score", " a red bicycle"), ("score", "What is it?"), ("generate", 4),
                 ("score", " a cup"), ("generate", 5)]
    args = (case["ckpt"], case["image"], case["root"])
    scores, answers = run_distributed(_body, 1, args=args + ([questions],))[0]

    def check(per_rank, owned):
        got_scores = [s for result in per_rank for s in result[0]]
        got_answers = [a for result in per_rank for a in result[1]]
        assert got_answers == answers
        for got, want in zip(got_scores, scores):
            assert got[1] == want[1]
            assert abs(got[0] - want[0]) < 1e-4 * max(1.0, abs(want[0])), (got, want)
        assert [len(r[0]) + len(r[1]) for r in per_rank] == [len(o) for o in owned]

    owned = [questions[:1] + questions[2:3], questions[1:2] + questions[3:4] + questions[4:]]
    check(run_distributed(_body, 2, args=args + (owned, 1, 2)), owned)
    owned = [questions[:1], questions[1:2] + questions[2:3], questions[3:4], questions[4:]]
    check(run_distributed(_body, 4, args=args + (owned, 2, 1), timeout=900), owned)
