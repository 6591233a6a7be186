"""The synthetic dataset: deterministic bytes, valid records, loadable media, paper-like mixtures."""
import glob
import json
import os

import pytest
import yaml

from mindspeed_vita.data.images import load_image
from mindspeed_vita.data.records import parse_line
from mindspeed_vita.data.synth import STAGE_RATIOS, write_synthetic_dataset
from mindspeed_vita.data.tiling import choose_grid
from mindspeed_vita.data.video import load_video_frames

SOURCES = tuple(STAGE_RATIOS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("synth_a")), seed=0)


def read_records(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def parsed_samples(path, root):
    with open(path, encoding="utf-8") as handle:
        return [parse_line(text, source="s", root=root, path=path, line=number)
                for number, text in enumerate(handle, start=1)]


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(dataset, tmp_path):
    again = write_synthetic_dataset(str(tmp_path / "again"), seed=0)
    other = write_synthetic_dataset(str(tmp_path / "other"), seed=1, n_single=8, n_comic=3, n_video=4, n_text=6)
    for name in SOURCES:
        for key in (name, f"{name}_heldout"):
            assert open(dataset[key], "rb").read() == open(again[key], "rb").read(), key
    for stage in ("stage1", "stage2", "stage3", "stage4", "heldout"):
        assert open(dataset[stage], "rb").read() == open(again[stage], "rb").read()
    for image in glob.glob(os.path.join(dataset["root"], "images", "*")):
        twin = os.path.join(again["root"], "images", os.path.basename(image))
        assert open(image, "rb").read() == open(twin, "rb").read(), image
    assert open(dataset["image_caption"], "rb").read() != open(other["image_caption"], "rb").read()


def test_default_counts_and_heldout_split(dataset):
    counts = {key: len(read_records(dataset[key])) for key in dataset if key.endswith(SOURCES + tuple(
        f"{name}_heldout" for name in SOURCES))}
    # 64 images -> 58 + 6 (one caption and one QA each); 16 comics -> 14 + 2; 8 clips -> 7 + 1;
    # 32 texts -> 16 short (14 + 2) and 16 long (14 + 2); 7 training clips -> 2 movies of 3
    assert counts == {
        "image_caption": 58, "image_caption_heldout": 6, "image_qa": 58, "image_qa_heldout": 6,
        "comic": 14, "comic_heldout": 2, "video_qa": 7, "video_qa_heldout": 1,
        "video_caption": 7, "video_caption_heldout": 1, "movie": 2, "movie_heldout": 0,
        "text_short": 14, "text_short_heldout": 2, "text_long": 14, "text_long_heldout": 2,
    }
    train_media = {p for name in SOURCES for r in read_records(dataset[name]) for p in r.get("images", [])
                   + r.get("videos", [])}
    heldout_media = {p for name in SOURCES for r in read_records(dataset[f"{name}_heldout"])
                     for p in r.get("images", []) + r.get("videos", [])}
    assert heldout_media and not train_media & heldout_media


def test_every_record_parses_with_its_files_and_both_schemas_occur(dataset):
    styles = set()
    for name in SOURCES:
        for key in (name, f"{name}_heldout"):
            samples = parsed_samples(dataset[key], dataset["root"])  # check_files=True
            styles |= {"conversations" if "conversations" in r else "messages" for r in read_records(dataset[key])}
            for sample in samples:
                assert sample.messages[-1].role == "assistant"
    assert styles == {"messages", "conversations"}
    comics = read_records(dataset["comic"])
    assert all(3 <= len(r["images"]) <= 6 for r in comics)
    assert all(r["messages"][0]["content"].count("<image>") == len(r["images"]) for r in comics)
    assert all(len(r["videos"]) == 3 for r in read_records(dataset["movie"]))


def test_answers_are_long_enough_to_pack_realistically(dataset):
    def answer_words(key):
        words = []
        for record in read_records(dataset[key]):
            turns = record.get("messages") or record.get("conversations")
            words.append(sum(len((t.get("content") or t.get("value")).split()) for t in turns
                             if t.get("role", t.get("from")) in ("assistant", "gpt")))
        return words

    assert min(answer_words("image_caption")) >= 50
    assert min(answer_words("comic")) >= 80
    assert min(answer_words("video_caption")) >= 80
    long_text = answer_words("text_long")
    assert max(long_text) >= 600
    prompts = [len(r["conversations"][0]["value"].split()) for r in read_records(dataset["text_long"])]
    assert max(prompts) >= 800  # long documents for stages 3-4


def test_images_load_and_tiling_varies(dataset):
    grids = set()
    for path in sorted(glob.glob(os.path.join(dataset["root"], "images", "*"))):
        image = load_image(path)
        grids.add(choose_grid(*image.size))
    assert len(grids) >= 6
    assert any(path.endswith(".jpg") for path in os.listdir(os.path.join(dataset["root"], "images")))


def test_videos_and_frame_directories_load(dataset):
    videos = sorted(glob.glob(os.path.join(dataset["root"], "videos", "*")))
    assert any(os.path.isdir(v) for v in videos) and any(v.endswith(".mp4") for v in videos)
    for path in videos:
        frames = load_video_frames(path, max_num_frame=8, frame_size=32)
        assert frames.ndim == 4 and 2 <= frames.shape[0] <= 8 and frames.shape[1:] == (3, 32, 32)


def test_stage_mixtures_follow_the_paper_logic(dataset):
    def ratios(key):
        config = yaml.safe_load(open(dataset[key]))
        assert set(config) == {"sources"}
        out = {}
        for source in config["sources"]:
            assert set(source) == {"name", "path", "root", "ratio", "num"} and source["num"] is None
            assert source["root"] == "."
            assert os.path.isfile(os.path.join(os.path.dirname(dataset[key]), source["path"]))
            out[source["name"]] = source["ratio"]
        return out

    assert ratios("stage1") == {"synth_image_caption": 1.0}
    assert ratios("stage2") == {"synth_image_caption": 1.0, "synth_image_qa": 1.0, "synth_video_qa": 1.0,
                                "synth_text_short": 1.0}
    stage3 = ratios("stage3")
    assert stage3["synth_comic"] == stage3["synth_video_caption"] == stage3["synth_text_long"] == 1.0
    assert stage3["synth_image_caption"] == 0.1 and "synth_movie" not in stage3
    assert ratios("stage4") == {**stage3, "synth_movie": 1.0}
    assert set(ratios("heldout")) == {f"synth_{n}_heldout" for n in SOURCES if n != "movie"}


def test_small_and_empty_configurations(tmp_path):
    paths = write_synthetic_dataset(str(tmp_path / "tiny"), seed=3, n_single=1, n_comic=0, n_video=0, n_text=0,
                                    heldout_fraction=0.0)
    assert len(read_records(paths["image_caption"])) == 1 and read_records(paths["comic"]) == []
    assert [s["name"] for s in yaml.safe_load(open(paths["stage4"]))["sources"]] == ["synth_image_caption",
                                                                                     "synth_image_qa"]
    assert yaml.safe_load(open(paths["heldout"])) == {"sources": []}
    with pytest.raises(ValueError, match="heldout_fraction"):
        write_synthetic_dataset(str(tmp_path / "bad"), heldout_fraction=1.0)


def test_stage_ratios_replace_the_papers_for_the_named_sources_only(tmp_path):
    paths = write_synthetic_dataset(str(tmp_path / "d"), seed=0, n_single=4, n_comic=1, n_video=1,
                                    n_text=2, stage_ratios={"image_qa": (0.0, 3.0, 0.1, 0.1)})
    stage2 = {s["name"]: s["ratio"] for s in yaml.safe_load(open(paths["stage2"]))["sources"]}
    assert stage2["synth_image_qa"] == 3.0
    assert stage2["synth_image_caption"] == STAGE_RATIOS["image_caption"][1]
    with pytest.raises(ValueError, match=r"stage_ratios: unknown source\(s\) \['image_ocr'\]"):
        write_synthetic_dataset(str(tmp_path / "e"), stage_ratios={"image_ocr": (1, 1, 1, 1)})


def test_shapes_of_one_picture_never_overlap(tmp_path):
    import random

    from mindspeed_vita.data.synth import POSITIONS, SIZES, _random_shapes

    rng = random.Random(0)
    for _ in range(300):
        shapes = _random_shapes(rng, rng.randint(1, 3), apart=True)
        for i, a in enumerate(shapes):
            for b in shapes[i + 1:]:
                (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
                # centres as fractions of a square canvas: farther apart than the two radii
                assert max(abs(ax - bx), abs(ay - by)) > SIZES[a.size] + SIZES[b.size]
