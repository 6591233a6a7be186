"""Context parallelism in the trainer: a demo stage at CP 2 on 2 processes gives the loss of
CP 1 on 1 process at every step (fp32, <= 1e-5 relative), and a CP 2 run killed with -9 and
run again continues with the rows of an uninterrupted CP 2 run."""
import os

import pytest

from tests.training.test_resume import _kill_after_step
from tests.training.train_helpers import REPO, rows, run, synthetic_data, train_command

STAGE3 = os.path.join(REPO, "configs", "demo", "stage3.yaml")
STEPS = ["training.train_iters=3", "training.save_interval=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(str(tmp_path_factory.mktemp("synth")))


def _cmd(data, run_dir, cp):
    return train_command(data, run_dir, [*STEPS, f"parallel.cp={cp}"], nproc=cp,
                         config=STAGE3, stage="stage3")


@pytest.fixture(scope="module")
def cp2_run(data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("cp2") / "run")
    run(_cmd(data, run_dir, 2))
    return run_dir


def test_cp2_equals_cp1_per_step(data, cp2_run, tmp_path):
    cp1 = str(tmp_path / "cp1")
    run(_cmd(data, cp1, 1))
    a, b = rows(cp1), rows(cp2_run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["label_tokens"] == y["label_tokens"]
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * abs(x["grad_norm"]), (x, y)


@pytest.mark.heavy
def test_cp2_kill_9_and_rerun(data, cp2_run, tmp_path):
    killed = str(tmp_path / "killed")
    cmd = _cmd(data, killed, 2)
    _kill_after_step(cmd, killed, step=2)
    run(cmd)
    assert rows(killed) == rows(cp2_run)
