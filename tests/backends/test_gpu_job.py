"""The GPU job (ci/run_gpu_tests.sh, ci/gpu_audit.py) on a CPU host, as a torch-only GPU host
would run it: GPU hosts here are offline with torch and pytest only, so every module the job
imports must work without the project's other dependencies. Those are blocked by an import
hook in a subprocess (`_torch_only`)."""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
#: the project's dependencies besides torch (with numpy, which torch.use_deterministic_algorithms
#: and torch.compile import) and pytest (setup.py): absent on a GPU host
NOT_ON_GPU_HOSTS = ("megatron", "transformers", "yaml", "pydantic", "PIL", "av", "safetensors",
                    "tokenizers", "psutil", "skimage", "pytest_timeout")
_BLOCKER = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_GPU_HOSTS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (torch-only host)", name=name)
sys.meta_path.insert(0, _Block())
"""


def _torch_only(code, *, env=None, timeout=600):
    """Run python `code` with the non-torch dependencies unimportable; (rc, stdout, stderr)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", **(env or {}))
    proc = subprocess.run([sys.executable, "-c", _BLOCKER + code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_blocker_blocks():
    rc, _, err = _torch_only("import pydantic")
    assert rc != 0 and "torch-only host" in err


def test_cli_error_is_one_line_on_a_torch_only_host():
    """An expected failure (no GPU here) must print the CLI's one-line error, not a traceback
    from importing the config schema (pydantic) while formatting it."""
    rc, out, err = _torch_only(
        "import sys; from mindspeed_vita.cli import main; "
        "sys.exit(main(['bench', 'attention', '--backend', 'cuda']))",
        env={"CUDA_VISIBLE_DEVICES": ""})
    assert rc == 2, err
    assert "mindspeed-vita: error: backend 'cuda' cannot run" in err
    assert "Traceback" not in err


def test_gpu_test_files_collect_on_a_torch_only_host():
    rc, out, err = _torch_only(
        "import sys, pytest; sys.exit(pytest.main(['-q', '--collect-only', '-p', "
        "'no:cacheprovider', '-m', 'gpu', 'tests/backends/test_cuda_backend.py', "
        "'tests/backends/test_cuda_fused.py']))")
    assert rc == 0, out + err
    assert " tests collected" in out and "error" not in out.lower()


def test_gpu_job_without_a_gpu_says_so(tmp_path):
    """On a host without a GPU the job writes its env record and stops with a clear line."""
    env = dict(os.environ, GPU_OUT=str(tmp_path), INSTALL="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", "ci/run_gpu_tests.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "no usable GPU" in summary
    info = json.loads((tmp_path / "env.json").read_text())
    assert info["cuda_available"] is False and info["impls"][0] == "torch"


def test_gpu_audit_dry_run_on_fakes_torch_only(tmp_path):
    """ci/gpu_audit.py's logic through the CPU fakes (AUDIT_DEVICE=cpu), torch-only: every
    check runs to the end without an exception and the JSON record is written."""
    out = tmp_path / "audit.json"
    rc, stdout, err = _torch_only(
        f"import runpy, sys; sys.argv = ['gpu_audit.py', '--out', {str(out)!r}]; "
        "runpy.run_path('ci/gpu_audit.py', run_name='__main__')",
        env={"AUDIT_DEVICE": "cpu"})
    assert rc == 0, stdout[-3000:] + err[-3000:]
    assert "EXCEPTION" not in stdout, stdout[-3000:]
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["checks"]


_FAKE_CUDA = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.mem_get_info = lambda device=None: (80 * 2**30, 80 * 2**30)
torch.cuda.get_device_name = lambda device=None: "fake GPU"
torch.cuda.get_device_capability = lambda device=None: (9, 0)
torch.version.cuda = "12.8"
"""


def test_gpu_job_runs_every_step_and_reports_each_failure(tmp_path):
    """With torch claiming a GPU it does not have, every step fails - and the job still runs
    each one (a failing test does not hide the benchmarks), records each in summary.txt and
    exits 1. Checks the job's bash logic, which otherwise first runs on an unattended GPU."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(_FAKE_CUDA)
    out = tmp_path / "out"
    env = dict(os.environ, GPU_OUT=str(out), PYTHONPATH=f"{fake}:{ROOT}", OMP_NUM_THREADS="2",
               GPU_JOB_DEMO="0")  # the demo step imports the whole stack: slow, same logic
    env.pop("INSTALL", None)  # auto: the fake CUDA torch imports, so nothing is installed
    proc = subprocess.run(["bash", "ci/run_gpu_tests.sh", "-x"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "install: skipped (a CUDA build of torch imports)" in summary
    assert json.loads((out / "env.json").read_text())["gpu"] == "fake GPU"
    for name in ("tests", "bench-torch-default", "bench-torch-default-json", "bench-torch-qwen2",
                 "bench-torch-qwen2-json", "audit"):
        assert f"[gpu] {name}: FAILED" in summary, summary
    assert "FAILED steps: tests bench-torch-default" in summary and "demo: skipped" in summary
    assert (out / "tests.txt").exists() and (out / "audit.txt").exists()
    assert (out / "bench-torch-qwen2.json.err").exists()
