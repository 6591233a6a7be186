"""Record validation: accepted schemas, normalisation, and one test per rejection reason."""
import copy
import json
import os
import pickle

import pytest

from mindspeed_vita.data.errors import REASONS, DataError
from mindspeed_vita.data.records import parse_line, parse_record


@pytest.fixture()
def media_root(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"not checked here")
    (tmp_path / "img" / "b.png").write_bytes(b"not checked here")
    (tmp_path / "clip.mp4").write_bytes(b"not checked here")
    (tmp_path / "frames").mkdir()
    return str(tmp_path)


def parse(obj, root, **kwargs):
    return parse_record(obj, source="src", root=root, path="data/src.jsonl", line=7, **kwargs)


VALID = {
    "messages": [
        {"role": "user", "content": "<image>\nWhat is in <image>? And <video>"},
        {"role": "assistant", "content": "Two images and a clip."},
    ],
    "images": ["img/a.png", "img/b.png"],
    "videos": ["clip.mp4"],
    "id": "extra keys are ignored",
}


def test_messages_record_becomes_sample_with_absolute_paths(media_root):
    sample = parse(VALID, media_root)
    assert sample.source == "src" and sample.line == 7 and sample.path == "data/src.jsonl"
    assert [(m.role, m.content) for m in sample.messages] == [
        ("user", "<image>\nWhat is in <image>? And <video>"),
        ("assistant", "Two images and a clip."),
    ]
    assert sample.images == [os.path.join(media_root, "img", "a.png"), os.path.join(media_root, "img", "b.png")]
    assert sample.videos == [os.path.join(media_root, "clip.mp4")]
    assert all(os.path.isabs(p) for p in sample.images + sample.videos)


def test_conversations_style_roles_are_normalised(media_root):
    record = {
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "<video>\nwhat happens?"},
            {"from": "gpt", "value": "a shape moves"},
            {"from": "human", "value": "and then?"},
            {"from": "gpt", "value": "it stops"},
        ],
        "videos": ["frames"],  # a directory of frames is a valid video
    }
    sample = parse(record, media_root)
    assert [m.role for m in sample.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sample.images == [] and sample.videos == [os.path.join(media_root, "frames")]


def test_absolute_paths_are_kept_and_text_only_needs_no_media(media_root):
    absolute = os.path.join(media_root, "img", "a.png")
    record = {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
              "images": [absolute], "videos": None}
    assert parse(record, "/somewhere/else").images == [absolute]
    text_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    sample = parse(text_only, media_root)
    assert sample.images == [] and sample.videos == []


def test_check_files_false_skips_the_filesystem(tmp_path):
    record = copy.deepcopy(VALID)
    sample = parse(record, str(tmp_path / "does-not-exist"), check_files=False)
    assert len(sample.images) == 2


def _with(**changes):
    record = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is _DROP:
            del record[key]
        else:
            record[key] = value
    return record


_DROP = object()
USER, ASSISTANT = {"role": "user", "content": "<image><image><video>"}, {"role": "assistant", "content": "ok"}

REJECTIONS = [
    ("not an object", ["a", "list"], "invalid_record", "JSON object"),
    ("no turns key", _with(messages=_DROP), "invalid_record", "exactly one of"),
    ("both turn keys", _with(conversations=[]), "invalid_record", "found both"),
    ("empty turns", _with(messages=[]), "invalid_record", "non-empty list"),
    ("turns not a list", _with(messages="hello"), "invalid_record", "non-empty list"),
    ("turn not an object", _with(messages=[USER, "ok"]), "invalid_record", "messages[1] must be an object"),
    ("turn without content", _with(messages=[USER, {"role": "assistant"}]), "invalid_record", "messages[1] needs"),
    ("from without value", _with(messages=[USER, {"from": "gpt", "text": "x"}]), "invalid_record", "messages[1] needs"),
    ("role not a string", _with(messages=[USER, {"role": 3, "content": "x"}]), "invalid_record",
     "role must be a string"),
    ("unknown role", _with(messages=[USER, {"role": "bot", "content": "x"}]), "unknown_role", "'bot'"),
    ("unknown from", _with(messages=[USER, {"from": "model", "value": "x"}]), "unknown_role", "'model'"),
    ("content not a string", _with(messages=[USER, {"role": "assistant", "content": None}]), "invalid_record",
     "content must be a string"),
    ("system not first", _with(messages=[USER, {"role": "system", "content": "x"}, ASSISTANT]), "invalid_record",
     "system turn may only be the first"),
    ("no assistant turn", _with(messages=[USER]), "invalid_record", "no assistant turn"),
    ("images not a list", _with(images="img/a.png"), "invalid_record", "'images' must be a list"),
    ("image path not a string", _with(images=["img/a.png", 5]), "invalid_record", "images[1]"),
    ("empty video path", _with(videos=[""]), "invalid_record", "videos[0]"),
    ("too few images", _with(images=["img/a.png"]), "tag_count_mismatch", "2 <image> tag(s)"),
    ("too many videos", _with(videos=["clip.mp4", "clip.mp4"]), "tag_count_mismatch", "1 <video> tag(s)"),
    ("singular key", _with(images=_DROP, image="img/a.png"), "tag_count_mismatch", "the key is 'images'"),
    ("missing image", _with(images=["img/a.png", "img/nope.png"]), "missing_file", "images[1]: no such file"),
    ("missing video", _with(videos=["nope.mp4"]), "missing_file", "videos[0]"),
]


@pytest.mark.parametrize("name, record, reason, fragment", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_every_rejection_has_a_reason_and_names_file_and_line(media_root, name, record, reason, fragment):
    with pytest.raises(DataError) as caught:
        parse(record, media_root)
    error = caught.value
    assert error.reason == reason
    assert isinstance(error, ValueError)
    assert (error.path, error.line) == ("data/src.jsonl", 7)
    assert str(error).startswith("data/src.jsonl:7: ")
    assert fragment in str(error)


def test_parse_line_accepts_a_json_line(media_root):
    sample = parse_line(json.dumps(VALID), source="src", root=media_root, path="f.jsonl", line=3)
    assert sample.line == 3 and len(sample.images) == 2


@pytest.mark.parametrize("text", ["{\"messages\": [", "", "   ", "{'single': 'quotes'}", "{} trailing"])
def test_parse_line_rejects_non_json_as_invalid_json(media_root, text):
    with pytest.raises(DataError) as caught:
        parse_line(text, source="src", root=media_root, path="f.jsonl", line=12)
    assert caught.value.reason == "invalid_json"
    assert str(caught.value).startswith("f.jsonl:12: not a JSON line")


def test_parse_line_rejects_json_that_is_not_an_object(media_root):
    with pytest.raises(DataError) as caught:
        parse_line("[1, 2]", source="src", root=media_root, path="f.jsonl", line=1)
    assert caught.value.reason == "invalid_record"


def test_data_error_fields_message_pickling_and_readdressing():
    error = DataError("corrupt_image", "cannot decode image", path="/media/a.png")
    assert str(error) == "/media/a.png: cannot decode image" and error.line is None
    restored = pickle.loads(pickle.dumps(error))  # data-loader workers send errors across processes
    assert (restored.reason, restored.path, restored.line, str(restored)) == (
        error.reason, error.path, error.line, str(error))
    readdressed = error.at("data/x.jsonl", 4)
    assert readdressed.reason == "corrupt_image"
    assert str(readdressed) == "data/x.jsonl:4: /media/a.png: cannot decode image"
    with pytest.raises(ValueError, match="unknown DataError reason"):
        DataError("bad_reason", "x", path="p")
    assert REASONS == {"invalid_json", "invalid_record", "unknown_role", "missing_file", "corrupt_image",
                       "corrupt_video", "tag_count_mismatch", "over_limit", "too_long"}
