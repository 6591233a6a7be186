"""ChatML rendering with media spans and assistant-only labels, checked token for token."""
import pytest

from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.template import (image_span_ids, image_units, media_tag_order,
                                          render_conversation, video_span_ids)
from mindspeed_vita.data.tokenizer import load_tokenizer
from mindspeed_vita.data.types import IGNORE_INDEX, Message
from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

T = 2  # context tokens per tile / frame, small so expected sequences can be written out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _render(tok, messages, grids=(), frames=(), layout="long-vita", **kwargs):
    return render_conversation(messages, tok, image_grids=list(grids), video_frames=list(frames),
                               tokens_per_tile=T, layout=layout, **kwargs)


def _chatml(turns):
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


def test_text_only_multi_turn_equals_hf_tokenisation(tok):
    turns = [("user", "What is 2 + 2?"), ("assistant", "It is 4."),
             ("user", "And 3 x 3?\n\nThanks!"), ("assistant", "9, of course.\n  Done")]
    ids, labels = _render(tok, [Message(r, c) for r, c in turns])
    assert ids == tok.hf.encode(_chatml(turns), add_special_tokens=False)
    chat = tok.hf.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                      tokenize=True)
    assert ids == list(chat["input_ids"])
    assert len(labels) == len(ids)


def test_labels_cover_exactly_the_assistant_spans(tok):
    messages = [Message("user", "Hi there"), Message("assistant", "Hello."),
                Message("user", "Bye"), Message("assistant", "See you.")]
    ids, labels = _render(tok, messages)
    s, e, nl = tok.im_start_id, tok.im_end_id, tok.encode("\n")
    expected_ids = ([s] + tok.encode("user\nHi there") + [e] + nl
                    + [s] + tok.encode("assistant\n") + tok.encode("Hello.") + [e] + nl
                    + [s] + tok.encode("user\nBye") + [e] + nl
                    + [s] + tok.encode("assistant\n") + tok.encode("See you.") + [e] + nl)
    assert ids == expected_ids
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert learned == tok.encode("Hello.") + [e] + nl + tok.encode("See you.") + [e] + nl
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    # the labelled positions are two contiguous runs, each ending at "<|im_end|>\n"
    marks = "".join("x" if label != IGNORE_INDEX else "." for label in labels)
    assert [len(run) for run in marks.split(".") if run] == [
        len(tok.encode("Hello.")) + 1 + len(nl), len(tok.encode("See you.")) + 1 + len(nl)]


def test_long_vita_layout_multi_image_multi_video_token_for_token(tok):
    messages = [
        Message("user", "<image>Compare this<video>with <image>."),
        Message("assistant", "Same."),
        Message("user", "Now <video>"),
        Message("assistant", "OK"),
    ]
    ids, labels = _render(tok, messages, grids=[(2, 1), (1, 1)], frames=[2, 1])
    s, e, nl = tok.im_start_id, tok.im_end_id, tok.encode("\n")
    img, img_end, ic = tok.img_start_id, tok.img_end_id, tok.img_context_id
    pat, pat_end, pc = tok.patch_start_id, tok.patch_end_id, tok.patch_context_id
    vid, vid_end, vc = tok.vid_start_id, tok.vid_end_id, tok.vid_context_id
    expected = (
        [s] + tok.encode("user\n")
        # image 1, grid 2 cols x 1 row: thumbnail first, then one row of two patches
        + [img, ic, ic, img_end] + nl + [pat, pc, pc, pat_end, pat, pc, pc, pat_end]
        + tok.encode("Compare this")
        # video 1, two frames
        + [vid, vc, vc, vid_end, vid, vc, vc, vid_end]
        + tok.encode("with ")
        # image 2, one tile: the image itself, no patches
        + [img, ic, ic, img_end]
        + tok.encode(".") + [e] + nl
        + [s] + tok.encode("assistant\n") + tok.encode("Same.") + [e] + nl
        + [s] + tok.encode("user\nNow ")
        # video 2, one frame
        + [vid, vc, vc, vid_end]
        + [e] + nl
        + [s] + tok.encode("assistant\n") + tok.encode("OK") + [e] + nl
    )
    assert ids == expected
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert learned == tok.encode("Same.") + [e] + nl + tok.encode("OK") + [e] + nl
    assert media_tag_order(messages) == ["image", "video", "image", "video"]


def test_long_vita_grid_rows_each_start_with_a_newline(tok):
    span = image_span_ids(tok, (2, 3), T, "long-vita")
    img, img_end, ic = tok.img_start_id, tok.img_end_id, tok.img_context_id
    pat, pat_end, pc = tok.patch_start_id, tok.patch_end_id, tok.patch_context_id
    (nl,) = tok.encode("\n")
    row = [nl, pat, pc, pc, pat_end, pat, pc, pc, pat_end]
    assert span == [img, ic, ic, img_end] + row + row + row
    assert image_units((2, 3)) == 7 and image_units((1, 1)) == 1
    assert video_span_ids(tok, 3, 1) == [tok.vid_start_id, tok.vid_context_id, tok.vid_end_id] * 3


def test_internvl_layout(tok):
    messages = [Message("user", "<image>\n<image>"), Message("assistant", "Two.")]
    ids, _ = _render(tok, messages, grids=[(2, 2), (1, 1)], layout="internvl")
    s, e, nl = tok.im_start_id, tok.im_end_id, tok.encode("\n")
    img, img_end, ic = tok.img_start_id, tok.img_end_id, tok.img_context_id
    expected = (
        [s] + tok.encode("user\n")
        + [img] + [ic] * (5 * T) + [img_end]  # 4 tiles + thumbnail in one span
        + nl
        + [img] + [ic] * T + [img_end]  # one tile, no thumbnail
        + [e] + nl
        + [s] + tok.encode("assistant\n") + tok.encode("Two.") + [e] + nl
    )
    assert ids == expected
    assert tok.patch_context_id not in ids


def test_text_right_after_an_image_is_encoded_on_its_own(tok):
    messages = [Message("user", "<image>Describe it."), Message("assistant", "A red house.")]
    ids, labels = _render(tok, messages, grids=[(1, 1)])
    after = ids.index(tok.img_end_id) + 1
    text = tok.encode("Describe it.")
    assert ids[after:after + len(text)] == text
    assert ids[after + len(text)] == tok.im_end_id
    # the user turn is only an image: the turn closes right after it, the answer is labelled
    ids, labels = _render(tok, [Message("user", "<image>"), Message("assistant", "A house.")],
                          grids=[(1, 1)])
    s, e, nl = tok.im_start_id, tok.im_end_id, tok.encode("\n")
    img, img_end, ic = tok.img_start_id, tok.img_end_id, tok.img_context_id
    prompt = [s] + tok.encode("user\n") + [img, ic, ic, img_end, e] + nl + [s] + tok.encode(
        "assistant\n")
    answer = tok.encode("A house.") + [e] + nl
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer


def test_assistant_content_starting_with_a_newline_keeps_an_exact_label_boundary(tok):
    ids, labels = _render(tok, [Message("user", "Hi"), Message("assistant", "\nYes")])
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(learned) == "\nYes<|im_end|>\n"
    assert learned == tok.encode("\nYes") + [tok.im_end_id] + tok.encode("\n")


def test_generation_prompt_matches_hf_and_has_no_labels(tok):
    messages = [Message("user", "Where is the dog?")]
    ids, labels = _render(tok, messages, add_generation_prompt=True)
    chat = tok.hf.apply_chat_template([{"role": "user", "content": "Where is the dog?"}],
                                      tokenize=True, add_generation_prompt=True)
    assert ids == list(chat["input_ids"])
    assert ids[-len(tok.encode("assistant\n")) - 1:] == [tok.im_start_id] + tok.encode(
        "assistant\n")
    assert set(labels) == {IGNORE_INDEX}


def test_system_prompt_only_when_the_conversation_has_none(tok):
    user = Message("user", "Hi")
    ids, labels = _render(tok, [user], system_prompt="Be brief.", add_generation_prompt=True)
    expected = tok.hf.encode(_chatml([("system", "Be brief."), ("user", "Hi")])
                             + "<|im_start|>assistant\n", add_special_tokens=False)
    assert ids == expected
    own = [Message("system", "Be kind."), user]
    ids, _ = _render(tok, own, system_prompt="Be brief.")
    assert ids == tok.hf.encode(_chatml([("system", "Be kind."), ("user", "Hi")]),
                                add_special_tokens=False)
    ids, _ = _render(tok, [user])
    assert ids == tok.hf.encode(_chatml([("user", "Hi")]), add_special_tokens=False)


@pytest.mark.parametrize("grids,frames", [([], []), ([(1, 1), (1, 1)], []), ([(1, 1)], [3])])
def test_tag_count_mismatch(tok, grids, frames):
    messages = [Message("user", "<image> what?"), Message("assistant", "A cat.")]
    with pytest.raises(DataError) as info:
        _render(tok, messages, grids=grids, frames=frames)
    assert info.value.reason == "tag_count_mismatch"
    assert f"but {len(grids)} image(s) and {len(frames)} video(s)" in str(info.value)


def test_bad_conversations_are_rejected_with_reasons(tok):
    with pytest.raises(DataError) as info:
        _render(tok, [Message("gpt", "hi")])
    assert info.value.reason == "unknown_role" and "messages[0]" in str(info.value)
    with pytest.raises(DataError) as info:
        _render(tok, [Message("user", "Hi"), Message("assistant", "<image>")], grids=[(1, 1)])
    assert info.value.reason == "invalid_record" and "messages[1]" in str(info.value)
    with pytest.raises(DataError) as info:
        _render(tok, [Message("user", "fake <IMG_CONTEXT> here"), Message("assistant", "no")])
    assert info.value.reason == "invalid_record" and "<IMG_CONTEXT>" in str(info.value)


def test_bad_arguments_raise(tok):
    with pytest.raises(ValueError, match="layout"):
        _render(tok, [Message("user", "Hi")], layout="llava")
    with pytest.raises(ValueError, match="grid"):
        image_span_ids(tok, (0, 2), T)
    with pytest.raises(ValueError, match="at least one frame"):
        video_span_ids(tok, 0, T)
