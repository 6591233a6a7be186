"""Bad input to `mindspeed-vita infer` and `convert`: one line naming the file or key, exit 2.

Each kind the issue lists, through the command line: a checkpoint whose tensor shapes disagree
with its config (native, HF InternVL, Qwen2 + InternViT), a missing or truncated weight file, an
unreadable image (not an image, truncated, missing), and `<image>` tags that do not match the
`--image` files (more and fewer).
"""
import json
import os
import shutil

import pytest
from PIL import Image

from mindspeed_vita.cli import main
from mindspeed_vita.convert.checkpoint import METADATA_FILE, weight_file_name
from mindspeed_vita.inference.engine import build_request
from tests.tiny_hf import save_tiny_internvit, save_tiny_internvl, save_tiny_qwen2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    paths = {name: str(root / name) for name in ("hf", "native", "qwen2", "internvit")}
    save_tiny_internvl(paths["hf"], seed=2)
    assert main(["convert", "import-hf", paths["hf"], paths["native"], "--tp", "2"]) == 0
    save_tiny_qwen2(paths["qwen2"], seed=3)
    save_tiny_internvit(paths["internvit"], seed=4)
    image = root / "wide.png"
    Image.new("RGB", (120, 60), "orange").save(image)
    paths["image"] = str(image)
    paths["root"] = str(root)
    return paths


def error_line(capsys, *argv) -> str:
    """Run the CLI; assert exit 2 and a single `mindspeed-vita: error:` line, the last one on
    stderr (only the command's own progress lines, "[infer] ...", may come before it)."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("mindspeed-vita: error: "), captured.err
    assert all(line.startswith("[infer] ") for line in lines[:-1]), captured.err
    assert "Traceback" not in captured.err
    return lines[-1]


def infer(capsys, checkpoint, *extra, prompt="Hello"):
    return error_line(capsys, "infer", "--checkpoint", checkpoint, "--prompt", prompt,
                      "--max-new-tokens", "2", *extra)


def copy_with_edit(src, dst, file, edit):
    """Copy the directory `src` to `dst` and apply `edit` to the JSON file `file` in it."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, file)
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


# ---------------------------------------------- (a) shapes that disagree with the config
def test_native_checkpoint_shapes_disagree_with_its_config(dirs, tmp_path, capsys):
    ckpt = str(tmp_path / "ffn96")
    copy_with_edit(dirs["native"], ckpt, METADATA_FILE,
                   lambda m: m["model_config"]["language"].update(ffn_hidden_size=96))
    message = infer(capsys, ckpt)
    assert f"weight file {ckpt}/{weight_file_name(0, 2)}" in message
    assert "tensor 'language.decoder.layers.0.mlp.linear_fc1.weight' has shape" in message
    assert "language.ffn_hidden_size=96" in message
    # export reads the same checkpoint and refuses it before writing anything
    out = str(tmp_path / "out")
    message = error_line(capsys, "convert", "export-hf", ckpt, out)
    assert message == (
        f"mindspeed-vita: error: checkpoint {ckpt!r} (config in its mindspeed_vita.json): "
        f"tensor 'language.decoder.layers.0.mlp.linear_fc1.weight' has shape (256, 64) but the "
        f"config gives (192, 64): the shape follows language.hidden_size=64, "
        f"language.ffn_hidden_size=96")
    assert not os.path.exists(out)


@pytest.mark.parametrize("part, key, value, expected", [
    ("vision_config", "intermediate_size", 48,
     "tensor 'vision.layers.0.mlp.fc1.weight' has shape (64, 32) but the config gives (48, 32): "
     "the shape follows vision_config.hidden_size=32, vision_config.intermediate_size=48"),
    ("text_config", "intermediate_size", 96,
     "'model.layers.0.mlp.gate_proj.weight' has shape (128, 64), expected (96, 64) from "
     "text_config.intermediate_size=96, text_config.hidden_size=64"),
    ("text_config", "num_key_value_heads", 4,
     "'model.layers.0.self_attn.k_proj.weight' has shape (32, 64), expected (64, 64) from "
     "text_config.num_key_value_heads=4"),
])
def test_hf_directory_shapes_disagree_with_config_json(dirs, tmp_path, capsys, part, key, value,
                                                       expected):
    src = str(tmp_path / "hf")
    config = copy_with_edit(dirs["hf"], src, "config.json", lambda c: c[part].update({key: value}))
    for message in (infer(capsys, src),
                    error_line(capsys, "convert", "import-hf", src, str(tmp_path / "dst"))):
        assert message.startswith(f"mindspeed-vita: error: weights of {src}: ")
        assert expected in message and message.endswith(f"(set in {config})")
    assert not os.path.exists(tmp_path / "dst")


def test_internvit_shapes_disagree_with_its_config_json(dirs, tmp_path, capsys):
    vit = str(tmp_path / "vit")
    config = copy_with_edit(dirs["internvit"], vit, "config.json",
                            lambda c: c.update(num_hidden_layers=3))
    message = error_line(capsys, "convert", "import-hf", dirs["qwen2"], str(tmp_path / "dst"),
                         "--vision", vit)
    assert f"weights of {vit}: no tensor 'vision.layers.2." in message
    assert f"num_hidden_layers=3 (set in {config})" in message


# ------------------------------------------------------------ (b) missing weight files
def test_missing_native_weight_file(dirs, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(dirs["native"], ckpt)
    os.remove(os.path.join(ckpt, weight_file_name(1, 2)))
    expected = f"checkpoint {ckpt!r} lacks weight file {weight_file_name(1, 2)}"
    assert expected in infer(capsys, ckpt)
    assert expected in error_line(capsys, "convert", "export-hf", ckpt, str(tmp_path / "out"))


def test_missing_hf_weight_files(dirs, tmp_path, capsys):
    bare = str(tmp_path / "bare")
    shutil.copytree(dirs["hf"], bare)
    os.remove(os.path.join(bare, "model.safetensors"))
    assert f"{bare}: no weights found (expected model.safetensors" in infer(capsys, bare)
    # a sharded directory whose index names a shard that is not there
    with open(os.path.join(bare, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}, f)
    expected = f"{bare}: weight file model-00002-of-00002.safetensors is missing"
    assert expected in infer(capsys, bare)
    assert expected in error_line(capsys, "convert", "import-hf", bare, str(tmp_path / "dst"))


@pytest.mark.parametrize("which", ["native", "hf"])
def test_truncated_weight_file(dirs, tmp_path, capsys, which):
    ckpt = str(tmp_path / which)
    shutil.copytree(dirs[which], ckpt)
    name = weight_file_name(0, 2) if which == "native" else "model.safetensors"
    path = os.path.join(ckpt, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    assert f"cannot read weight file {path}: " in infer(capsys, ckpt)


# ------------------------------------------------------------- (c) unreadable images
def test_unreadable_images_are_named(dirs, tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a PNG")
    assert infer(capsys, dirs["native"], "--image", str(not_image)) == (
        f"mindspeed-vita: error: --image {not_image}: cannot read image header "
        f"(UnidentifiedImageError: cannot identify image file '{not_image}')")

    missing = tmp_path / "nowhere.jpg"
    assert infer(capsys, dirs["native"], "--image", str(missing)) == (
        f"mindspeed-vita: error: argument --image: {missing}: no such file (see "
        f"`mindspeed-vita infer --help`)")
    assert infer(capsys, dirs["native"], "--image", str(tmp_path)) == (
        f"mindspeed-vita: error: argument --image: {tmp_path}: is a directory, not a file (see "
        f"`mindspeed-vita infer --help`)")

    # the header is intact, the pixel data is cut: found only when it is decoded
    whole = tmp_path / "whole.png"
    Image.effect_noise((200, 100), 64).convert("RGB").save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert infer(capsys, dirs["native"], "--image", str(truncated)) == (
        f"mindspeed-vita: error: {truncated}: cannot decode image (OSError: image file is "
        f"truncated)")


# --------------------------------------------------------- (d) tags versus --image files
def test_more_image_tags_than_files(dirs, capsys):
    message = infer(capsys, dirs["native"], "--image", dirs["image"],
                    prompt="<image> and <image>: compare them")
    assert "--prompt has 2 <image> tag(s) but 1 --image file(s) were given" in message


def test_fewer_image_tags_than_files(dirs, capsys):
    message = infer(capsys, dirs["native"], "--image", dirs["image"], "--image", dirs["image"],
                    prompt="<image> what is this?")
    assert "--prompt has 1 <image> tag(s) but 2 --image file(s) were given" in message


def test_tags_without_any_file(dirs, capsys):
    message = infer(capsys, dirs["native"], prompt="<image> describe")
    assert "--prompt has 1 <image> tag(s) but 0 --image file(s) were given" in message
    message = infer(capsys, dirs["native"], prompt="<video> describe")
    assert "--prompt has 1 <video> tag(s) but 0 --video file(s) were given" in message


def test_untagged_files_go_before_the_text(dirs):
    request = build_request("Compare.", [dirs["image"], dirs["image"]])
    assert request.messages[0].content == "<image>\n<image>\nCompare."
    tagged = build_request("First <image>, then <image>.", [dirs["image"], dirs["image"]])
    assert tagged.messages[0].content == "First <image>, then <image>."
    assert build_request("Just text").messages[0].content == "Just text"
