"""`env` reports our version and the optional accelerator packages without importing them."""
import json
import sys

from mindspeed_vita import __version__
from mindspeed_vita.cli import main
from mindspeed_vita.commands.env import installed_version


def test_env_reports_versions_without_importing_accelerator_packages(capsys):
    capsys.readouterr()
    assert main(["env", "--json", "--backend", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mindspeed_vita"] == __version__ and info["backend"] == "cpu"
    for key in ("torch", "megatron_core", "transformers", "torch_npu", "flash_attn"):
        assert info[key]
    assert "torch_npu" not in sys.modules and "flash_attn" not in sys.modules


def test_installed_version_reads_metadata_or_finds_the_module():
    import pytest as installed

    assert installed_version("pytest", "pytest") == installed.__version__
    assert installed_version("surely-not-a-distribution", "surely_not_a_module") is None
    # importable without metadata (a source checkout on PYTHONPATH): said so, not a version
    assert installed_version("surely-not-a-distribution", "json").startswith("installed")
