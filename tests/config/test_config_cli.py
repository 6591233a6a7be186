"""`mindspeed-vita config ... --world-size N`: a bad layout is one line naming the key, exit 2."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(*args):
    r = subprocess.run([sys.executable, "-m", "mindspeed_vita.cli", "config", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO))
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("args, expected", [
    (["--world-size", "0"], "--world-size: must be a positive integer, got 0"),
    (["--world-size=-8"], "--world-size: must be a positive integer, got -8"),
    (["--world-size", "48"], "'parallel.tp' * 'parallel.pp' * 'parallel.cp' = 8 * 1 * 8 = 64 does "
                             "not divide the world size 48"),
    (["parallel.pp=2", "--world-size", "128"], "'parallel.pp' = 2"),
    (["parallel.dp=2", "--world-size", "64"], "= 128 is not the world size 64"),
    (["data.seq_length=1000", "--world-size", "64"],
     "'data.seq_length' = 1000 is not divisible by 2 * 'parallel.cp' * 'parallel.tp' = 128"),
])
def test_bad_layouts_are_one_line_exit_2(args, expected):
    code, _, err = _config("configs/stages/stage4.yaml", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err


def test_a_good_world_size_prints_the_layout():
    code, out, err = _config("configs/stages/stage3.yaml", "--world-size", "512")
    assert code == 0, err
    assert "# layout for world size 512: tp=8 pp=1 cp=2 dp=32" in out
