"""Weight files get the umask's mode like every other file; the demo's model config ships in
the package (and equals configs/model/tiny.yaml); setup.py ships it as package data."""

import os
import stat
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

from mindspeed_vita.convert.safetensors_file import save_safetensors
from mindspeed_vita.demo.run import tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_weight_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = tmp_path / "w.safetensors"
        save_safetensors({"a": torch.zeros(2)}, str(path))
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


def test_a_converted_checkpoint_is_readable_like_its_directory(tmp_path):
    from mindspeed_vita.cli import main
    from tests.tiny_hf import save_tiny_internvl

    old = os.umask(0o022)
    try:
        save_tiny_internvl(str(tmp_path / "hf"), seed=1)
        assert main(["convert", "import-hf", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
        assert main(["convert", "export-hf", str(tmp_path / "native"), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    for directory in ("native", "out"):
        for name in os.listdir(tmp_path / directory):
            if name.endswith(".safetensors"):
                assert stat.S_IMODE((tmp_path / directory / name).stat().st_mode) == 0o644, name


def test_the_packaged_tiny_model_is_configs_model_tiny():
    with open(os.path.join(REPO, "configs", "model", "tiny.yaml"), encoding="utf-8") as f:
        assert tiny_model_config() == yaml.safe_load(f)


def test_a_built_wheel_ships_the_demo_config(tmp_path):
    # what a regular (non-editable) install gets: build the wheel from a copy of the sources
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        (src / name).write_bytes(open(os.path.join(REPO, name), "rb").read())
    for package in ("mindspeed_vita", "backends"):
        subprocess.run(["cp", "-r", os.path.join(REPO, package), str(src / package)], check=True)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = os.listdir(tmp_path / "dist")
    names = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    assert "mindspeed_vita/demo/tiny_model.yaml" in names
    assert "mindspeed_vita/py.typed" in names
