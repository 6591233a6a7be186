"""`infer --cp 2` and `serve --cp 2` as a user launches them (shell/infer.sh -> torchrun, two
gloo processes) give the single-process answer; `infer` never crashes on what a random model
generates (200 tokens, an image in the prompt, at CP 1 and CP 2)."""
import json
import os
import subprocess

import pytest

from tests.dist_utils import run_distributed
from tests.server_utils import free_port, openai_client, wait_until_healthy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "Describe the picture in detail."


def _save(rank, world, out):
    from PIL import Image

    from mindspeed_vita.convert.checkpoint import save_checkpoint
    from mindspeed_vita.data.tokenizer import load_tokenizer
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer
    from tests.tiny_vita import tiny_vita

    tok = load_tokenizer(build_tiny_tokenizer(os.path.join(out, "tok")))
    model = tiny_vita(tok, seed=3)
    save_checkpoint(model, os.path.join(out, "ckpt"), tok)
    Image.new("RGB", (150, 100), "purple").save(os.path.join(out, "img.png"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cpcli"))
    run_distributed(_save, 1, args=(out,))
    return out


def _env(nproc: int) -> dict:
    env = dict(os.environ, MINDSPEED_VITA_BACKEND="cpu", NPROC_PER_NODE=str(nproc),
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _infer(ckpt, nproc, *extra):
    cmd = ["bash", os.path.join(REPO, "shell", "infer.sh"), "--checkpoint",
           os.path.join(ckpt, "ckpt"), "--prompt", PROMPT, "--image",
           os.path.join(ckpt, "img.png"), "--json", *extra]
    r = subprocess.run(cmd, env=_env(nproc), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, r.stdout  # rank 0 prints, the other ranks do not
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def one_process(ckpt):
    return _infer(ckpt, 1, "--max-new-tokens", "200")


def test_infer_cp2_equals_cp1_for_200_tokens(ckpt, one_process):
    one = one_process
    two = _infer(ckpt, 2, "--max-new-tokens", "200", "--cp", "2")
    assert one["prompt_tokens"] > 20 and len(one["token_ids"]) >= 1
    assert two["token_ids"] == one["token_ids"] and two["text"] == one["text"]
    assert max(abs(a - b) for a, b in zip(one["logprobs"], two["logprobs"])) < 1e-4


def test_serve_cp2_answers_like_one_process(ckpt, one_process):
    openai = pytest.importorskip("openai")
    from mindspeed_vita.convert.checkpoint import TOKENIZER_DIR
    from mindspeed_vita.data.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(ckpt, "ckpt", TOKENIZER_DIR))
    first = one_process["token_ids"][:12]
    assert len(first) == 12 and not set(first) & set(tok.stop_token_ids)
    expected = tok.decode(first, skip_special_tokens=True)  # what 12 tokens alone answer
    port = free_port()
    proc = subprocess.Popen(
        ["bash", os.path.join(REPO, "shell", "infer.sh"), "serve", "--checkpoint",
         os.path.join(ckpt, "ckpt"), "--cp", "2", "--port", str(port), "--max-new-tokens", "12",
         "--allow-local-media", ckpt],
        env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        wait_until_healthy(proc, port, timeout=400, poll=1)
        client = openai_client(port, timeout=300)
        content = [{"type": "image_url", "image_url": {"url": os.path.join(ckpt, "img.png")}},
                   {"type": "text", "text": PROMPT}]
        for _ in range(2):  # the followers serve request after request
            reply = client.chat.completions.create(
                model="ckpt", temperature=0, messages=[{"role": "user", "content": content}])
            assert reply.choices[0].message.content == expected
        # a bad request is refused on rank 0 alone; the ranks stay in step afterwards
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}])
        stream = client.chat.completions.create(
            model="ckpt", temperature=0, stream=True,
            messages=[{"role": "user", "content": content}])
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
