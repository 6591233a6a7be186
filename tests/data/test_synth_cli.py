"""`data synth`: writes the same bytes as `write_synthetic_dataset`, lists what it wrote, builds
the tiny tokenizer on request, and refuses bad flags with one-line errors."""
import os

from mindspeed_vita.cli import main
from mindspeed_vita.data.mixture import MixtureConfig
from mindspeed_vita.data.synth import write_synthetic_dataset
from mindspeed_vita.data.tokenizer import load_tokenizer

SMALL = ["--n-single", "4", "--n-comic", "2", "--n-video", "4", "--n-text", "4"]


def test_synth_writes_the_dataset_and_lists_it(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["data", "synth", str(out), "--seed", "3", *SMALL]) == 0
    printed = capsys.readouterr().out
    reference = write_synthetic_dataset(str(tmp_path / "reference"), seed=3, n_single=4, n_comic=2, n_video=4,
                                        n_text=4)
    for name, path in reference.items():
        if name == "root":
            continue
        mine = out / os.path.basename(path)
        assert mine.read_bytes() == open(path, "rb").read(), name
        assert str(mine) in printed
    assert "image_caption" in printed and "(3 records)" in printed and "(1 record)" in printed
    assert not (out / "tokenizer").exists()
    for stage in range(1, 5):
        assert MixtureConfig.from_yaml(str(out / f"stage{stage}.yaml")).sources  # the files exist
    # another seed gives other data
    assert main(["data", "synth", str(tmp_path / "seed4"), "--seed", "4", *SMALL]) == 0
    assert (tmp_path / "seed4" / "image_caption.jsonl").read_bytes() != (out / "image_caption.jsonl").read_bytes()


def test_synth_builds_the_tiny_tokenizer_on_request(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["data", "synth", str(out), "--n-single", "2", "--n-comic", "0", "--n-video", "0", "--n-text", "2",
                 "--write-tokenizer"]) == 0
    assert f"tokenizer -> {out / 'tokenizer'}" in capsys.readouterr().out
    tokenizer = load_tokenizer(str(out / "tokenizer"))
    assert tokenizer.decode(tokenizer.encode("Describe the image.")) == "Describe the image."


def test_synth_rejects_bad_flags(capsys, tmp_path):
    assert main(["data", "synth", str(tmp_path / "a"), "--n-text", "-1"]) == 2
    assert "argument --n-text: must be >= 0, got -1" in capsys.readouterr().err
    assert main(["data", "synth", str(tmp_path / "a"), "--heldout-fraction", "1.0"]) == 2
    assert "--heldout-fraction 1.0: must be in [0, 1)" in capsys.readouterr().err
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["data", "synth", str(not_a_dir)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
