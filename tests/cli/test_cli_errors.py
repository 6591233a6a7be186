"""The CLI turns expected failures into one clear line and a non-zero exit."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-m", "mindspeed_vita.cli", *args], cwd=REPO,
                          capture_output=True, text=True, env=full_env, timeout=120)


def test_npu_without_cann_is_one_line():
    r = _run(["env"], MINDSPEED_VITA_BACKEND="npu")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "torch_npu" in lines[0] and "CANN" in lines[0] and "Traceback" not in r.stderr


def test_cuda_without_gpu_is_one_line():
    r = _run(["env"], MINDSPEED_VITA_BACKEND="cuda")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cuda" in lines[0] and "Traceback" not in r.stderr


def test_config_error_names_key():
    r = _run(["config", "configs/stages/stage3.yaml", "parallel.tp=3"])
    assert r.returncode == 2
    assert "'parallel.tp' = 3" in r.stderr and "Traceback" not in r.stderr


def test_config_world_size():
    r = _run(["config", "configs/stages/stage4.yaml", "--world-size", "64"])
    assert r.returncode == 0, r.stderr
    assert "tp=8 pp=1 cp=8 dp=1" in r.stdout


def test_env_cpu():
    r = _run(["env", "--json"], MINDSPEED_VITA_BACKEND="cpu")
    assert r.returncode == 0 and '"backend": "cpu"' in r.stdout
