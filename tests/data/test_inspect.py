"""`data inspect`: counts against the JSONL files, tile grids against the tiling rule, the JSON
schema, every kind of bad record counted under its reason, strict mode, and packing utilisation."""
import json
import os
import re

import av
import numpy as np
import pytest
from PIL import Image

from mindspeed_vita.cli import main
from mindspeed_vita.data.synth import write_synthetic_dataset
from mindspeed_vita.data.tiling import choose_grid
from mindspeed_vita.data.video import sampled_frame_count
from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = os.path.join(REPO, "configs", "model", "tiny.yaml")
TINY_TILE, TINY_MAX_TILES = 56, 6  # configs/model/tiny.yaml
SOURCE_KEYS = {"records", "samples", "tokens", "label_tokens", "max_tokens", "images", "tiles", "videos",
               "frames", "visual_units", "rejected"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The default-size synthetic dataset (about a second to write)."""
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), seed=0)


def inspect_json(capsys, *args):
    capsys.readouterr()
    assert main(["data", "inspect", *args, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_synthetic_mixture_counts_tiles_and_schema(capsys, synth, tokenizer_dir):
    report, _ = inspect_json(capsys, synth["stage2"], "--tokenizer", tokenizer_dir, "--model-config", TINY_MODEL,
                             "--seq-length", "2048")
    assert {"kind", "mode", "model", "data", "records", "records_per_epoch", "sources", "total", "rejected",
            "rejected_examples", "packing", "samples", "tokenizer", "input", "elapsed_s"} <= set(report)
    assert report["kind"] == "mixture" and report["mode"] == "grids_only"
    assert report["rejected"] == {} and report["rejected_examples"] == {}

    # stage 2 of the synthetic set: every record of these four files once (ratio 1.0)
    files = {"synth_image_caption": "image_caption", "synth_image_qa": "image_qa",
             "synth_video_qa": "video_qa", "synth_text_short": "text_short"}
    assert set(report["sources"]) == set(files)
    records = {name: read_jsonl(synth[key]) for name, key in files.items()}
    for name, source_records in records.items():
        counts = report["sources"][name]
        assert SOURCE_KEYS | {"path", "ratio", "num", "records_in_file", "records_per_epoch"} <= set(counts)
        assert counts["records"] == counts["samples"] == counts["records_in_file"] == len(source_records)
        assert counts["images"] == sum(len(r.get("images", [])) for r in source_records)
        assert counts["videos"] == sum(len(r.get("videos", [])) for r in source_records)
    assert report["records"] == report["records_per_epoch"] == sum(len(r) for r in records.values())

    samples = report["samples"]
    assert {(s["source"], s["line"]) for s in samples} == {
        (name, line) for name, source_records in records.items() for line in range(1, len(source_records) + 1)}
    root = synth["root"]
    for entry in samples:
        assert set(entry) == {"source", "line", "tokens", "tiles", "frames"}
        record = records[entry["source"]][entry["line"] - 1]
        sizes = [Image.open(os.path.join(root, path)).size for path in record.get("images", [])]
        assert entry["tiles"] == [list(choose_grid(w, h, max_tiles=TINY_MAX_TILES, tile_size=TINY_TILE))
                                  for w, h in sizes]
        assert entry["frames"] == [sampled_frame_count(os.path.join(root, path), max_num_frame=64)
                                   for path in record.get("videos", [])]
    # the synthetic images are built so the tile grid varies
    assert len({tuple(map(tuple, s["tiles"])) for s in samples if s["tiles"]}) >= 3

    total = report["total"]
    assert total["tokens"] == sum(s["tokens"] for s in samples)
    assert total["tiles"] == sum(c * r for s in samples for c, r in s["tiles"])
    assert total["frames"] == sum(f for s in samples for f in s["frames"])
    # thumbnails: one per image of more than one tile
    thumbnails = sum(1 for s in samples for c, r in s["tiles"] if c * r > 1)
    assert total["visual_units"] == total["tiles"] + thumbnails + total["frames"]
    for key in SOURCE_KEYS - {"rejected", "max_tokens"}:
        assert total[key] == sum(counts[key] for counts in report["sources"].values()), key
    assert 0 < total["label_tokens"] < total["tokens"]

    packing = report["packing"]
    assert packing["mode"] == "reset" and packing["seq_length"] == 2048 and packing["lookahead"] == 16
    assert packing["samples"] == len(samples) and packing["real_tokens"] == total["tokens"]
    assert packing["slots"] == packing["rows"] * 2048
    assert packing["utilisation"] == pytest.approx(total["tokens"] / packing["slots"])
    assert 0.9 < packing["streaming_utilisation"] <= 1.0 and packing["streaming_rows"] < packing["rows"]


def test_full_decode_agrees_with_header_only_counts(capsys, synth, tokenizer_dir):
    common = [synth["stage3"], "--tokenizer", tokenizer_dir, "--model-config", TINY_MODEL, "--seq-length", "8192"]
    dry, _ = inspect_json(capsys, *common)
    decoded, _ = inspect_json(capsys, *common, "--decode")
    assert decoded["mode"] == "decode"
    for key in ("sources", "total", "rejected", "samples", "packing"):
        assert decoded[key] == dry[key], key
    assert dry["total"]["frames"] > 0 and dry["total"]["images"] > 0


def test_utilisation_of_the_synthetic_mixture_at_16k_is_reported_and_high(capsys, synth, tokenizer_dir):
    # the real geometry (448-pixel tiles, 256 tokens each): samples of up to ~3.8K tokens
    assert main(["data", "inspect", synth["stage2"], "--tokenizer", tokenizer_dir, "--seq-length", "16384"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"utilisation \d+\.\d%", text) and "without the end-of-epoch flush" in text
    report, _ = inspect_json(capsys, synth["stage2"], "--tokenizer", tokenizer_dir, "--seq-length", "16384")
    assert report["model"]["tokens_per_tile"] == 256 and report["total"]["max_tokens"] > 3000
    packing = report["packing"]
    assert packing["streaming_rows"] >= 10
    assert packing["streaming_utilisation"] >= 0.95
    assert packing["dropped_overlong"] == 0


def _write_mp4(path, frames=16, fps=4):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def bad_jsonl(tmp_path):
    """A JSONL with three good records and one record of every kind of bad input; returns
    (path, {line: reason})."""
    Image.new("RGB", (120, 60), "red").save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"these bytes are not an image" * 10)
    _write_mp4(tmp_path / "good.mp4")
    whole = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(whole[: len(whole) // 2])

    def record(user, answer="Fine.", **media):
        return json.dumps({"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": answer}], **media})

    lines = [
        ("ok", record("<image>\nWhat colour is it?", "Red.", images=["good.png"])),
        ("invalid_json", '{"messages": [oops'),
        ("unknown_role", json.dumps({"messages": [{"role": "robot", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"}]})),
        ("missing_file", record("<image>\nDescribe.", images=["nowhere.png"])),
        ("corrupt_image", record("<image>\nDescribe.", images=["corrupt.png"])),
        ("corrupt_video", record("<video>\nWhat happens?", videos=["truncated.mp4"])),
        ("ok", record("<video>\nWhat happens?", "It gets brighter.", videos=["good.mp4"])),
        ("tag_count_mismatch", record("<image> and <image>", images=["good.png"])),
        ("over_limit", record("<image><image><image>", images=["good.png"] * 3)),
        ("too_long", record("Tell me a long story.", "the shape moved " * 200)),
        ("invalid_record", json.dumps({"messages": []})),
        ("ok", record("What is 2 + 3?", "5")),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(text for _, text in lines) + "\n")
    return str(path), {number: reason for number, (reason, _) in enumerate(lines, start=1)}


BAD_FLAGS = ["--model-config", TINY_MODEL, "--seq-length", "256", "--max-images", "2"]


def test_every_bad_record_is_counted_under_its_reason(capsys, bad_jsonl, tokenizer_dir):
    path, reasons = bad_jsonl
    report, _ = inspect_json(capsys, path, "--tokenizer", tokenizer_dir, *BAD_FLAGS)
    assert report["kind"] == "jsonl"
    expected = {reason: 1 for reason in reasons.values() if reason != "ok"}
    assert report["rejected"] == expected
    (source,) = report["sources"].values()
    assert source["records"] == len(reasons) and source["rejected"] == expected
    assert source["samples"] == 3 and len(report["samples"]) == 3
    assert sorted(s["line"] for s in report["samples"]) == [n for n, r in reasons.items() if r == "ok"]
    for reason, examples in report["rejected_examples"].items():
        line = next(n for n, r in reasons.items() if r == reason)
        assert examples == [examples[0]] and examples[0].startswith(f"{path}:{line}: "), reason
    image_sample = next(s for s in report["samples"] if s["line"] == 1)
    assert image_sample["tiles"] == [list(choose_grid(120, 60, max_tiles=TINY_MAX_TILES, tile_size=TINY_TILE))]
    video_sample = next(s for s in report["samples"] if s["line"] == 7)
    assert video_sample["frames"] == [4]  # 16 frames at 4 fps -> 1 frame per second
    assert report["packing"]["dropped_overlong"] == 1  # the too_long record, dropped by the packer

    # the text report names every reason with a file:line example
    assert main(["data", "inspect", path, "--tokenizer", tokenizer_dir, *BAD_FLAGS]) == 0
    text = capsys.readouterr().out
    for reason in expected:
        assert re.search(rf"{reason}: 1\n    e\.g\. {re.escape(path)}:\d+: ", text), reason


def test_strict_mode_fails_on_the_first_bad_record_with_its_location(capsys, bad_jsonl, tokenizer_dir):
    path, reasons = bad_jsonl
    capsys.readouterr()
    assert main(["data", "inspect", path, "--tokenizer", tokenizer_dir, *BAD_FLAGS, "--strict"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    match = re.fullmatch(rf"mindspeed-vita: error: {re.escape(path)}:(\d+): .+\n", captured.err.splitlines(True)[-1])
    assert match and reasons[int(match.group(1))] != "ok"


def test_limit_workers_and_progress(capsys, synth, tokenizer_dir):
    args = [synth["stage2"], "--tokenizer", tokenizer_dir, "--model-config", TINY_MODEL, "--limit", "10"]
    alone, err = inspect_json(capsys, *args)
    assert alone["records"] == 10 and alone["records_per_epoch"] > 10
    # off a terminal: progress lines with count, share, elapsed < left, rate
    assert re.search(r"\[inspect\] records: 0/10 \(0%\) 00:00<\?, \? records/s", err)
    assert re.search(r"\[inspect\] records: 10/10 \(100%\) \d\d:\d\d<00:00, [\d.]+ records/s", err)
    pooled, _ = inspect_json(capsys, *args, "--num-workers", "1")
    for key in ("sources", "total", "samples", "packing"):
        assert pooled[key] == alone[key], key


def test_stage_config_settings_are_used(capsys, tmp_path, synth, tokenizer_dir):
    stage = tmp_path / "stage.yaml"
    stage.write_text(f"model: {TINY_MODEL}\n"
                     f"data: {{mixture: {synth['stage3']}, seq_length: 4096, packing: joint, seed: 7,"
                     f" max_num_frame: 2}}\n")
    report, _ = inspect_json(capsys, str(stage), "--tokenizer", tokenizer_dir)
    assert report["kind"] == "stage"
    data = report["data"]
    assert (data["seq_length"], data["packing"], data["seed"], data["max_num_frame"]) == (4096, "joint", 7, 2)
    assert report["packing"]["mode"] == "joint" and report["model"]["image_size"] == TINY_TILE
    assert all(f <= 2 for s in report["samples"] for f in s["frames"])
    # command-line flags override the stage's data keys
    report, _ = inspect_json(capsys, str(stage), "--tokenizer", tokenizer_dir, "--packing", "reset",
                             "--seq-length", "8192")
    assert (report["data"]["packing"], report["data"]["seq_length"]) == ("reset", 8192)


def test_bad_inputs_are_one_line_errors(capsys, tmp_path, tokenizer_dir):
    assert main(["data", "inspect", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err
    no_data = tmp_path / "stage.yaml"
    no_data.write_text(f"model: {TINY_MODEL}\n")
    assert main(["data", "inspect", str(no_data), "--tokenizer", tokenizer_dir]) == 2
    assert "config key 'data.mixture' is not set" in capsys.readouterr().err
    stage = tmp_path / "bad.yaml"
    stage.write_text("data: {seq_length: -4}\n")
    assert main(["data", "inspect", str(stage)]) == 2
    assert "data.seq_length" in capsys.readouterr().err
