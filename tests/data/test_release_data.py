"""The Long-VITA release's data: JSON-array files, its mixture YAML, media paths as written,
recursive frame directories, and `data inspect` / `data convert-mixture` on them."""
import json
import os
import random

import numpy as np
import pytest
import yaml
from PIL import Image

from mindspeed_vita.cli import main
from mindspeed_vita.data.errors import DataError
from mindspeed_vita.data.json_array import JsonArraySource, build_element_index
from mindspeed_vita.data.loader import parse_record
from mindspeed_vita.data.mixture import MixtureConfig, MixtureStream
from mindspeed_vita.data.source_index import JsonlSource, open_source
from mindspeed_vita.data.video import list_frame_files, sampled_frame_count
from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer
from mindspeed_vita.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = os.path.join(REPO, "configs", "model", "tiny.yaml")


def record(i, image=None):
    # strings with brackets, commas, quotes and backslashes: the scanner must see through them
    question = f"Q{i}: what is [this], {{really}}? \"quoted\" \\ back\\\\slash"
    if image:
        return {"messages": [{"role": "user", "content": "<image>\n" + question},
                             {"role": "assistant", "content": f"A{i}, [ok]"}], "images": [image]}
    return {"conversations": [{"role": "human", "content": question},
                              {"role": "gpt", "content": f"A{i}"}]}


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_elements_are_indexed_without_loading(tmp_path, indent):
    rng = random.Random(indent or 0)
    records = [record(i) if rng.random() < 0.5 else {"x": [1, {"y": "]"}], "i": i}
               for i in range(40)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    raw = path.read_bytes()
    for chunk_bytes in (1, 3, 17, 1 << 20):  # chunk seams inside strings, escapes, brackets
        starts, ends, lines = build_element_index(str(path), chunk_bytes=chunk_bytes)
        assert [json.loads(raw[a:b]) for a, b in zip(starts, ends)] == records
        assert lines.tolist() == [raw[:a].count(b"\n") + 1 for a in starts]
    source = open_source(str(path), cache_dir=str(tmp_path / "cache"))
    assert isinstance(source, JsonArraySource) and len(source) == 40
    line, text = source.read(7)
    assert json.loads(text) == records[7] and line == lines[7]
    # the cached index is reused by the next reader (every rank and worker)
    assert len(os.listdir(tmp_path / "cache")) == 1
    again = open_source(str(path), cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.element_ends, source.element_ends)
    assert isinstance(open_source(str(tmp_path / "data.json")), JsonArraySource)


def test_jsonl_stays_jsonl_and_bad_arrays_name_the_file(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(record(i)) for i in range(3)) + "\n")
    assert type(open_source(str(jsonl))) is JsonlSource
    for text, message in (("[{\"a\": 1}, ", "not closed"), ("[1,,2]", "doubled comma"),
                          ("[1, 2,]", "trailing comma"), ("[1] [2]", "after the end"),
                          ("[1]]", "unbalanced")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(DataError, match=f"{bad}: .*{message}"):
            open_source(str(bad))
    empty = tmp_path / "empty.json"
    empty.write_text(" [\n ] \n")
    assert len(open_source(str(empty))) == 0


def test_a_bad_element_is_reported_at_its_line(tmp_path):
    path = tmp_path / "data.json"
    items = [record(0), {"messages": "not a list"}, record(2)]
    path.write_text(json.dumps(items, indent=1))
    config = MixtureConfig.from_dict({"sources": [{"name": "s", "path": str(path)}]},
                                     base_dir=str(tmp_path), origin="test")
    stream = MixtureStream(config, seed=0)
    raw = stream.read(0, 1)
    with pytest.raises(DataError) as caught:
        parse_record(raw)
    assert str(caught.value).startswith(f"{path}:{raw.line}: ")
    # the line is where element 1 starts in the file
    lines = path.read_text().splitlines()
    assert lines[raw.line - 1].strip() == "{" and '"not a list"' in lines[raw.line]


def test_media_paths_as_written_or_relative_to_root(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "work" / "img")
    os.makedirs(tmp_path / "data")
    Image.new("RGB", (20, 10), "red").save(tmp_path / "work" / "img" / "a.png")
    path = tmp_path / "data" / "d.json"
    path.write_text(json.dumps([record(0, image="img/a.png")]))
    monkeypatch.chdir(tmp_path / "work")
    config = MixtureConfig.from_dict(
        {"sources": [{"name": "as", "path": str(path), "paths": "as_written"},
                     {"name": "rel", "path": str(path), "root": str(tmp_path / "work")},
                     {"name": "default", "path": str(path)}]},
        base_dir=str(tmp_path), origin="test")
    stream = MixtureStream(config, seed=0)
    expected = str(tmp_path / "work" / "img" / "a.png")
    assert parse_record(stream.read(0, 0)).images == [expected]
    assert parse_record(stream.read(1, 0)).images == [expected]
    with pytest.raises(DataError, match="missing_file|no such file"):
        parse_record(stream.read(2, 0))  # relative to the data file's directory: not there
    with pytest.raises(UserInputError, match=r"sources\[0\].*root.*as_written"):
        MixtureConfig.from_dict({"sources": [{"name": "x", "path": str(path), "root": "/",
                                              "paths": "as_written"}]},
                                base_dir=str(tmp_path), origin="test")


@pytest.fixture()
def release_layout(tmp_path, monkeypatch):
    """A working directory laid out as the release's scripts expect: data paths and media
    paths relative to it, one JSONL and two JSON-array files, and a release mixture YAML."""
    work = tmp_path / "work"
    os.makedirs(work / "datasets" / "jsonl")
    os.makedirs(work / "images")
    for i in range(4):
        Image.new("RGB", (60 + 30 * i, 40), (40 * i, 90, 20)).save(work / "images" / f"{i}.jpg")
    with_images = [record(i, image=f"images/{i % 4}.jpg") for i in range(6)]
    (work / "datasets" / "jsonl" / "caps.jsonl").write_text(
        "\n".join(json.dumps(r) for r in with_images) + "\n")
    (work / "datasets" / "jsonl" / "qa.json").write_text(json.dumps(with_images[:5], indent=2))
    (work / "datasets" / "jsonl" / "text.json").write_text(json.dumps(
        [record(i) for i in range(10)], indent=4))
    mixture = {"xlsx_sample_num": 5, "dataset": {
        "Caps": {"ratio": 1.0, "data_paths": ["datasets/jsonl/caps.jsonl",
                                              "datasets/jsonl/qa.json"]},
        "Text": {"ratio": 0.5, "num": 3, "data_paths": ["datasets/jsonl/text.json"]},
        "Unused": {"ratio": 0, "data_paths": ["datasets/jsonl/not_downloaded.jsonl"]}}}
    (work / "stage.yaml").write_text(yaml.safe_dump(mixture))
    monkeypatch.chdir(work)
    return work


def test_release_mixture_yaml_loads(release_layout):
    config = MixtureConfig.from_yaml("stage.yaml")
    spec = {s.name: s for s in config.sources}
    assert list(spec) == ["Caps[0]", "Caps[1]", "Text"]  # ratio 0: dropped, files never opened
    assert spec["Caps[1]"].path == str(release_layout / "datasets" / "jsonl" / "qa.json")
    assert all(s.paths == "as_written" for s in config.sources)
    stream = MixtureStream(config, seed=3)
    # per file, as the release: 6 + 5 records at ratio 1; min(int(10 * 0.5), 3) = 3
    assert stream.counts == [6, 5, 3] and stream.lengths == [6, 5, 10]
    sample = parse_record(stream.read(1, 2))
    assert sample.images == [str(release_layout / "images" / "2.jpg")]


def test_release_mixture_errors_name_the_key(release_layout):
    for entry, key in (({"ratio": -1, "data_paths": ["a"]}, "dataset.Bad.ratio"),
                       ({"ratio": 1, "num": 2.5, "data_paths": ["a"]}, "dataset.Bad.num"),
                       ({"ratio": 1}, "dataset.Bad.data_paths"),
                       ({"ratio": 1, "data_path": ["a"]}, "dataset.Bad.data_path")):
        with open("bad.yaml", "w") as f:
            yaml.safe_dump({"dataset": {"Bad": entry}}, f)
        with pytest.raises(UserInputError, match=f"bad.yaml: {key}"):
            MixtureConfig.from_yaml("bad.yaml")
    with open("missing.yaml", "w") as f:
        yaml.safe_dump({"dataset": {"Gone": {"data_paths": ["nope.jsonl"]}}}, f)
    with pytest.raises(UserInputError,
                       match=r"missing.yaml: .*no such file .*nope.jsonl \(source 'Gone'\)"):
        MixtureConfig.from_yaml("missing.yaml")


def test_data_inspect_counts_the_release_mixture(release_layout, capsys, tmp_path):
    tokenizer = build_tiny_tokenizer(str(tmp_path / "tok"))
    capsys.readouterr()
    assert main(["data", "inspect", "stage.yaml", "--json", "--tokenizer", tokenizer,
                 "--model-config", TINY_MODEL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "mixture" and report["rejected"] == {}
    sources = report["sources"]
    assert {k: v["records"] for k, v in sources.items()} == {"Caps[0]": 6, "Caps[1]": 5,
                                                             "Text": 3}
    assert sources["Caps[1]"]["images"] == 5 and sources["Text"]["images"] == 0
    # one JSON-array file on its own
    capsys.readouterr()
    assert main(["data", "inspect", "datasets/jsonl/text.json", "--json", "--tokenizer",
                 tokenizer, "--model-config", TINY_MODEL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "jsonl" and report["records"] == 10 and report["rejected"] == {}


def test_convert_mixture_writes_our_format(release_layout, capsys):
    assert main(["data", "convert-mixture", "stage.yaml", "ours.yaml"]) == 0
    written = yaml.safe_load(open("ours.yaml"))
    assert [s["name"] for s in written["sources"]] == ["Caps[0]", "Caps[1]", "Text"]
    assert written["sources"][2] == {"name": "Text", "paths": "as_written", "ratio": 0.5,
                                     "num": 3, "path": str(release_layout / "datasets" /
                                                           "jsonl" / "text.json")}
    direct, converted = MixtureConfig.from_yaml("stage.yaml"), MixtureConfig.from_yaml("ours.yaml")
    assert direct == converted
    capsys.readouterr()
    assert main(["data", "convert-mixture", "stage.yaml", "ours.yaml"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_frame_directories_are_walked_recursively(tmp_path):
    root = tmp_path / "video"
    for part, names in (("clip10", ["f1.jpg", "f2.jpg"]), ("clip2", ["f10.png", "f9.png"]),
                        (".", ["f0.jpg", "notes.txt"])):
        os.makedirs(root / part, exist_ok=True)
        for name in names:
            if name.endswith(".txt"):
                (root / part / name).write_text("x")
            else:
                Image.new("RGB", (8, 8)).save(root / part / name)
    files = [os.path.relpath(f, root) for f in list_frame_files(str(root))]
    assert files == ["clip2/f9.png", "clip2/f10.png", "clip10/f1.jpg", "clip10/f2.jpg",
                     "f0.jpg"]
    assert sampled_frame_count(str(root), max_num_frame=64) == 5
