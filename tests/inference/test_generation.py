"""KV-cache generation equals re-running the whole sequence; sampling rules; the demo runs."""
import json
import os

import pytest
import torch

from mindspeed_vita.data.tokenizer import load_tokenizer
from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer
from mindspeed_vita.inference.engine import Generator, build_request
from mindspeed_vita.inference.sampling import SamplingParams, choose_next_token
from mindspeed_vita.parallel.process_groups import destroy_parallel
from tests.tiny_vita import tiny_vita

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    tok = load_tokenizer(build_tiny_tokenizer(str(out / "tok")))
    model = tiny_vita(tok, seed=7)
    from PIL import Image

    img = out / "wide.png"
    Image.new("RGB", (200, 90), "teal").save(img)
    yield model, tok, str(img)
    destroy_parallel()


def test_kv_cache_generation_equals_full_recompute(tiny):
    model, tok, img = tiny
    gen = Generator(model, tok)
    ids, pixels = gen.render(build_request("What is in the picture?", [img]))
    assert pixels.shape[0] > 1  # a tiled image: thumbnail + tiles
    result = gen.generate_ids(ids, pixels, max_new_tokens=6)
    assert len(result.token_ids) >= 1
    seq = ids.clone()
    with torch.no_grad():
        for token, logprob in zip(result.token_ids, result.logprobs):
            pos = torch.arange(seq.shape[1])[None]
            logits = model.logits(seq, pos, pixels)[:, -1].float()
            assert int(logits.argmax(-1)) == token
            assert abs(float(torch.log_softmax(logits, -1)[0, token]) - logprob) < 1e-4
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)


def test_image_tag_count_mismatch_is_clear(tiny):
    model, tok, img = tiny
    gen = Generator(model, tok)
    with pytest.raises(Exception, match="tag"):
        gen.render(build_request("<image><image> two tags", [img]))


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    tok, lp = choose_next_token(logits, SamplingParams())
    assert int(tok) == 1 and abs(float(lp) - float(torch.log_softmax(logits, -1)[0, 1])) < 1e-6
    g = torch.Generator().manual_seed(0)
    tiny_p = [int(choose_next_token(logits, SamplingParams(greedy=False, top_p=0.01), g)[0])
              for _ in range(20)]
    assert set(tiny_p) == {1}  # top-p keeps only the top token
    draws = lambda seed: [int(choose_next_token(logits, SamplingParams(greedy=False, temperature=5.0),  # noqa: E731
                                                torch.Generator().manual_seed(seed))[0]) for _ in range(1)]
    assert draws(3) == draws(3)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(greedy=False, temperature=0.0)


def test_demo_runs_end_to_end(tmp_path):
    # a fresh process, as a user runs it (this module holds megatron's parallel state); the
    # four stages at one step each on one process (the real demo: 2 processes, CP 2)
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mindspeed_vita.cli", "demo", "--out", str(tmp_path),
                        "--steps", "1", "--seq-length", "1024", "--max-new-tokens", "3",
                        "--nproc", "1", "--eval-images", "1", "--backend", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert len(summary["losses"]) == 4 and all(l > 0 for l in summary["losses"])
    assert summary["generation"]["prompt_tokens"] > 0
    assert summary["generation_video"]["prompt_tokens"] > 0
    assert set(summary["heldout_accuracy"]) == {"chance", "untrained", "trained"}
    for n in (1, 2, 3, 4):
        lines = (tmp_path / f"stage{n}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1]
        assert (tmp_path / f"stage{n}" / "latest").read_text().strip() == "iter_0000001"
