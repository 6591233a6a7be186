"""lmms-eval chat messages -> our request, and generation kwargs -> our sampling (no lmms-eval
needed: these are the adapter's pure parts)."""
import os

import pytest
from PIL import Image

from mindspeed_vita.errors import UserInputError
from mindspeed_vita.eval.messages import chat_to_sample, cut_at_stop, sampling_from_gen_kwargs


def test_parts_become_tags_in_place_and_images_files(tmp_path):
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "url": image},
                                     {"type": "text", "text": "Compare with"},
                                     {"type": "video", "url": str(video)},
                                     {"type": "text", "text": "What changed?"}]},
        {"role": "assistant", "content": "A lamp moved."},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}]
    sample = chat_to_sample(messages, str(tmp_path))
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "user"]
    assert sample.messages[1].content == "<image>\nCompare with\n<video>\nWhat changed?"
    assert sample.messages[2].content == "A lamp moved."
    assert sample.videos == [str(video)]
    saved = Image.open(sample.images[0])
    assert os.path.dirname(sample.images[0]) == str(tmp_path)
    assert list(saved.getdata()) == list(image.getdata())  # lossless


def test_bad_messages_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="role 'tool'"):
        chat_to_sample([{"role": "tool", "content": "x"}], str(tmp_path))
    with pytest.raises(UserInputError, match="'audio' is not supported"):
        chat_to_sample([{"role": "user", "content": [{"type": "audio", "url": "a.wav"}]}],
                       str(tmp_path))
    with pytest.raises(UserInputError, match="does not exist"):
        chat_to_sample([{"role": "user", "content": [{"type": "image", "url": "/nope.png"}]}],
                       str(tmp_path))


def test_generation_kwargs():
    max_new, sampling, stops = sampling_from_gen_kwargs({"temperature": 0, "until": ["\n\n"]},
                                                        256)
    assert max_new == 256 and sampling.greedy and stops == ["\n\n"]
    max_new, sampling, stops = sampling_from_gen_kwargs(
        {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "until": "END"}, 256)
    assert (max_new, sampling.greedy, sampling.temperature, sampling.top_p) == (8, False, 0.7,
                                                                               0.9)
    assert stops == ["END"]
    assert cut_at_stop("an answer END more\n\nx", ["\n\n", "END"]) == "an answer "
    assert cut_at_stop("no stop", []) == "no stop"


def test_simple_request_visuals_then_context(tmp_path):
    """A "simple" request (doc_to_visual's list, possibly nested, then the context string)."""
    from mindspeed_vita.eval.messages import user_turn

    image = Image.new("RGB", (30, 20), (10, 200, 30))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    photo = tmp_path / "photo.JPG"
    image.save(photo)
    turn = user_turn([[image], str(video), str(photo)], "Question?")
    sample = chat_to_sample(turn, str(tmp_path))
    assert sample.messages[0].content == "<image>\n<video>\n<image>\nQuestion?"
    assert sample.images[1] == str(photo) and sample.videos == [str(video)]
    assert chat_to_sample(user_turn(None, "Text only."), str(tmp_path)).images == []
    with pytest.raises(UserInputError, match="unsupported media object int"):
        chat_to_sample(user_turn([3], "x"), str(tmp_path))


def test_eval_cli_builds_the_lmms_eval_command_line():
    import argparse

    from mindspeed_vita.eval.cli import add_arguments, lmms_eval_argv

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "/ck", "--tasks", "a,b", "--cp", "2",
                              "--backend", "cpu", "--lmms-args=--force_simple --log_samples"])
    assert lmms_eval_argv(args) == [
        "--model", "mindspeed_vita", "--model_args", "checkpoint=/ck,backend=cpu,cp=2",
        "--tasks", "a,b", "--batch_size", "1", "--force_simple", "--log_samples"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "/ck", "--tasks", "a", "--cp", "0"])
