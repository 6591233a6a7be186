"""Bad configuration or launch environment: one clear line naming the problem, exit code 2,
before any process group starts or any tensor is computed."""
import os
import subprocess

import pytest

from tests.training.train_helpers import REPO, env, synthetic_data, train_command


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(str(tmp_path_factory.mktemp("synth")))


def _refused(cmd, extra_env=None):
    result = subprocess.run(cmd, env={**env(), **(extra_env or {})}, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "[train] step" not in result.stdout  # nothing was computed
    return errors[0]


def _plan_error(data, tmp_path, overrides):
    """The error `plan_start` (the trainer's checks before any compute) raises, in-process."""
    from mindspeed_vita.config.loader import load_config
    from mindspeed_vita.errors import UserInputError
    from mindspeed_vita.training.trainer import plan_start

    cmd = train_command(data, str(tmp_path / "run"), overrides)
    stage = load_config(cmd[4], cmd[5:])
    with pytest.raises((UserInputError, ValueError)) as info:  # ConfigError is a ValueError
        plan_start(stage, 1)
    return str(info.value)


def test_missing_checkpoint_to_start_from(data, tmp_path):
    line = _plan_error(data, tmp_path, [f"training.load={tmp_path / 'no-such-run'}"])
    assert "training.load" in line and "no-such-run" in line


def test_world_size_not_matching_the_layout(data, tmp_path):
    # what torchrun would export for a 3-process launch of a cp=2 stage
    line = _refused(train_command(data, str(tmp_path / "run"), ["parallel.cp=2"]),
                    {"WORLD_SIZE": "3", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "1"})
    assert "parallel.cp" in line and "world size 3" in line


def test_unwritable_run_directory(data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = _plan_error(data, tmp_path, [f"training.save={blocker / 'run'}"])
    assert "training.save" in line and "not writable" in line


def test_a_stage_that_freezes_everything(data, tmp_path):
    line = _refused(train_command(data, str(tmp_path / "run"), ["training.trainable=[]"]))
    assert "training.trainable" in line
    assert not os.path.exists(tmp_path / "run")


def test_fault_injection_on_a_rank_the_launch_does_not_have(data, tmp_path):
    line = _plan_error(data, tmp_path, ["training.fault_injection.rank=3"])
    assert "training.fault_injection.rank" in line and "world size 1" in line
    line = _refused(train_command(data, str(tmp_path / "run"),
                                  ["training.fault_injection.nonfinite_loss_steps=[0]"]))
    assert "nonfinite_loss_steps" in line and "1-based" in line
