"""Kill -9 a training run mid-way, run the same command again: it resumes from the latest
checkpoint and its metrics rows equal those of an uninterrupted run, bit for bit on CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.training.train_helpers import REPO, env, rows, run, synthetic_data, train_command

STEPS = ["training.train_iters=5", "training.save_interval=2", "training.keep_last=2"]
#: the regression baseline (rewrite it with `python -m tests.training.write_baseline`)
BASELINE = os.path.join(REPO, "tests", "baselines", "demo_stage2_loss.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(str(tmp_path_factory.mktemp("synth")))


def _kill_after_step(cmd, run_dir, step, timeout=600):
    """Start `cmd`, SIGKILL it as soon as metrics.jsonl has row `step`."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
            if os.path.isfile(metrics):
                with open(metrics) as f:
                    if sum(1 for line in f if line.strip()) >= step:
                        break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no row {step} within {timeout} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _check_baseline(rows_):
    """The regression baseline: the loss curve of this short run at fixed seeds, within 1%."""
    with open(BASELINE) as f:
        baseline = json.load(f)
    for row in rows_:
        ref = baseline["loss"][str(row["step"])]
        assert abs(row["loss"] - ref) <= baseline["tolerance_rel"] * ref, (row["step"],
                                                                          row["loss"], ref)


def test_kill_9_and_rerun_equals_uninterrupted(data, tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run(train_command(data, straight, STEPS))
    expected = rows(straight)
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5]
    _check_baseline(expected)

    cmd = train_command(data, killed, STEPS)
    _kill_after_step(cmd, killed, step=3)  # checkpoint 2 is complete, step 3 is not saved
    assert open(os.path.join(killed, "latest")).read().strip() == "iter_0000002"
    out = run(cmd).stdout
    assert "resuming from" in out and "iter_0000002" in out
    assert rows(killed) == expected  # rows 1-2 kept, 3-5 recomputed: identical
    # the last K (default 2) checkpoints are kept, the newest is the end of the run
    assert sorted(n for n in os.listdir(killed) if n.startswith("iter_")) == [
        "iter_0000004", "iter_0000005"]
    assert os.path.isfile(os.path.join(killed, "loss.png"))

    # one format: infer reads the run directory, export-hf writes an HF directory from it,
    # and both generate the same greedy tokens
    hf = str(tmp_path / "hf")
    run([sys.executable, "-m", "mindspeed_vita.cli", "convert", "export-hf", killed, hf])
    answers = [run([sys.executable, "-m", "mindspeed_vita.cli", "infer", "--checkpoint", src,
                    "--prompt", "Hello", "--max-new-tokens", "4", "--backend", "cpu"]).stdout
               for src in (killed, hf)]
    assert answers[0] == answers[1] and answers[0].strip()


def test_sigterm_saves_a_checkpoint_and_exits(data, tmp_path):
    """SIGTERM (what a scheduler sends before killing a job) saves the step it is at; the
    same command then resumes from there."""
    run_dir = str(tmp_path / "run")
    cmd = train_command(data, run_dir, ["training.train_iters=50", "training.save_interval=0"])
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and open(metrics).read().count("\n") >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: saved" in out
    latest = open(os.path.join(run_dir, "latest")).read().strip()
    saved_step = int(latest.split("_")[1])
    assert 2 <= saved_step < 50
    resumed = subprocess.Popen(cmd + ["training.train_iters=" + str(saved_step + 1)], env=env(),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    out = resumed.communicate(timeout=600)[0]
    # one more step from the saved one (the schedule keeps the checkpoint's length)
    assert resumed.returncode == 0 and f"resuming from {run_dir}/{latest}" in out, out[-3000:]
    assert f"step {saved_step + 1}/{saved_step + 1}" in out
