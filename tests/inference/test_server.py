"""The OpenAI-compatible server over real HTTP on loopback, driven by the official client."""
import base64
import concurrent.futures
import io
import os
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mindspeed_vita.data.tokenizer import load_tokenizer  # noqa: E402
from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402
from mindspeed_vita.inference.engine import Generator  # noqa: E402
from mindspeed_vita.config.schema import InferenceConfig  # noqa: E402
from mindspeed_vita.inference.sampling import SamplingParams  # noqa: E402
from mindspeed_vita.inference.server import create_app  # noqa: E402
from mindspeed_vita.inference.service import GenerationService  # noqa: E402
from mindspeed_vita.parallel.process_groups import destroy_parallel  # noqa: E402
from tests.server_utils import free_port, openai_client, wait_until_healthy  # noqa: E402
from tests.tiny_vita import tiny_vita  # noqa: E402


def _png(color, size=(120, 80)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(payload: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    media = out / "media"
    media.mkdir()
    (media / "red.png").write_bytes(_png("red"))
    (out / "secret.png").write_bytes(_png("blue"))
    tok = load_tokenizer(build_tiny_tokenizer(str(out / "tok")))
    model = tiny_vita(tok, seed=11)
    gen = Generator(model, tok)
    limits = InferenceConfig(max_prompt_tokens=600, max_images=2, max_new_tokens=64,
                          max_request_bytes=200_000, request_timeout=120.0,
                          allow_local_media=str(media))
    service = GenerationService(gen, limits)
    app = create_app(service, model_name="tiny-vita")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    client = openai_client(port, timeout=120)
    yield {"client": client, "gen": gen, "media": media, "out": out, "port": port}
    srv.should_exit = True
    thread.join(timeout=10)
    service.close()
    destroy_parallel()


def _solo(gen, prompt, image_paths=(), max_new_tokens=12, seed=0, temperature=None):
    sampling = (SamplingParams() if temperature is None
                else SamplingParams(greedy=False, temperature=temperature))
    return gen.generate(prompt, image_paths, max_new_tokens=max_new_tokens, sampling=sampling,
                        seed=seed)


def _ask(client, content, **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(
        model="tiny-vita", messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(server):
    import json
    import urllib.request

    assert [m.id for m in server["client"].models.list().data] == ["tiny-vita"]
    with urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/health") as r:
        assert json.load(r) == {"status": "ok"}


def test_text_answer_equals_the_engine_alone(server):
    reply = _ask(server["client"], "Hello there", temperature=0)
    alone = _solo(server["gen"], "Hello there")
    assert reply.choices[0].message.content == alone.text
    assert reply.usage.prompt_tokens == alone.prompt_tokens
    assert reply.usage.completion_tokens == len(alone.token_ids)
    assert reply.choices[0].finish_reason == ("stop" if alone.stop_reason == "stop_token"
                                              else "length")


def test_image_parts_inline_and_local(server):
    red = str(server["media"] / "red.png")
    alone = _solo(server["gen"], "<image>\nWhat colour?", [red])
    for url in (_data_uri(_png("red")), red, "red.png", f"file://{red}"):
        reply = _ask(server["client"], [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "What colour?"}], temperature=0)
        assert reply.choices[0].message.content == alone.text, url
        assert reply.usage.prompt_tokens == alone.prompt_tokens


def test_concurrent_requests_each_get_their_own_answer(server):
    client, gen = server["client"], server["gen"]
    jobs = [("one two three", None, 0), ("a cat on a mat", 0.9, 5), ("numbers 1 2 3", 1.3, 9),
            ("Hello there", None, 0)]
    expected = [_solo(gen, p, seed=s, temperature=t).text for p, t, s in jobs]

    def call(job):
        prompt, temperature, seed = job
        return _ask(client, prompt, temperature=temperature or 0, seed=seed
                    ).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(call, jobs))
    assert got == expected
    assert len(set(expected)) > 1  # the prompts really differ in output


def test_stream_concatenates_to_the_plain_answer(server):
    client = server["client"]
    for kw in ({"temperature": 0}, {"temperature": 1.1, "seed": 3}, {"temperature": 0, "stop": ["e"]}):
        plain = _ask(client, "stream me a story", max_tokens=20, **kw)
        chunks = list(_ask(client, "stream me a story", max_tokens=20, stream=True,
                           stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and
                  c.choices[0].finish_reason]
        assert finish == [plain.choices[0].finish_reason]
        assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_stop_string_cuts_the_answer(server):
    client = server["client"]
    full = _ask(client, "Hello there", max_tokens=30, temperature=0).choices[0].message.content
    # the seeded tiny model answers a long string here; a short one would leave nothing to cut
    assert len(full) >= 3, full
    stop = full[1:3]
    reply = _ask(client, "Hello there", max_tokens=30, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("content, status, words", [
    ([{"type": "image_url", "image_url": {"url": _data_uri(b"not an image at all")}},
      {"type": "text", "text": "?"}], 400, "cannot"),
    ([{"type": "image_url", "image_url": {"url": _data_uri(_png("red")[:60])}},
      {"type": "text", "text": "?"}], 400, "image"),
    ([{"type": "image_url", "image_url": {"url": "missing.png"}}], 400, "does not exist"),
    ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], 400,
     "unsupported content part"),
    ([{"type": "image_url", "image_url": {"url": "../secret.png"}}], 400, "outside"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], 400, "remote"),
    ([{"type": "image_url", "image_url": {"url": _data_uri(_png("red"))}}] * 3, 400,
     "max_images"),
    ("word " * 800, 400, "max_prompt_tokens"),
    ("x" * 300_000, 413, "max_request_bytes"),
    ("hi", 400, "max_new_tokens"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, content, status, words):
    client = server["client"]
    with pytest.raises(openai.APIStatusError) as info:
        _ask(client, content, max_tokens=100 if content == "hi" else 12)
    assert info.value.status_code == status
    assert words in info.value.message
    assert _ask(client, "still there?", max_tokens=2).choices  # the server kept serving


def test_secret_outside_allowed_dir_via_absolute_and_symlink(server):
    client, media, out = server["client"], server["media"], server["out"]
    link = media / "link.png"
    if not link.exists():
        os.symlink(out / "secret.png", link)
    for url in (str(out / "secret.png"), "link.png"):
        with pytest.raises(openai.BadRequestError, match="outside"):
            _ask(client, [{"type": "image_url", "image_url": {"url": url}}])


def test_generation_never_emits_visual_tokens(server):
    gen = server["gen"]
    banned = gen.banned_ids.tolist()
    # make every visual token the most likely one: the ban must still hold
    head = gen.model.language.output_layer.weight
    saved = head.detach().clone()
    with torch.no_grad():
        head[banned] = saved.abs().max() * 50 * torch.sign(saved.sum(0))[None]
    try:
        result = gen.generate("hi", max_new_tokens=40)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert not set(result.token_ids) & set(banned)


def test_serve_command_end_to_end(server, tmp_path):
    """`mindspeed-vita serve` as a user starts it: loads a checkpoint, answers, refuses bad
    flags in one line."""
    import subprocess
    import sys

    from mindspeed_vita.convert.checkpoint import save_checkpoint

    gen = server["gen"]
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(gen.model, ckpt, gen.tokenizer)
    bad = subprocess.run([sys.executable, "-m", "mindspeed_vita.cli", "serve", "--checkpoint",
                          ckpt, "--allow-local-media", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--allow-local-media" in bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mindspeed_vita.cli", "serve", "--checkpoint",
                             ckpt, "--port", str(port), "--max-new-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(proc, port, timeout=300)
        client = openai_client(port, timeout=120)
        reply = client.chat.completions.create(model="ckpt", temperature=0,
                                               messages=[{"role": "user", "content": "Hello there"}])
        assert reply.choices[0].message.content == _solo(gen, "Hello there", max_new_tokens=8).text
        assert [m.id for m in client.models.list().data] == ["ckpt"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
