"""TensorBoard scalars of a training run, read back with TensorBoard's own EventAccumulator
(skipped only where the tensorboard package is absent); without the package one info line."""
import logging
import math
import os
import sys

import pytest

from mindspeed_vita.training.metrics import MetricsWriter, read_metrics


def _row(step, loss):
    return {"step": step, "loss": loss, "grad_norm": 0.5 * step, "tokens_per_s": 100.0 + step,
            "skipped_steps": 0, "mfu": None,
            "lr": {"default": 1e-3 / step, "vision.layer0": 1e-5 / step}}


def _scalars(log_dir):
    """{tag: {step: value}} of every scalar event under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_scalars_are_written_and_a_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    metrics, tb = str(tmp_path / "metrics.jsonl"), str(tmp_path / "tensorboard")
    writer = MetricsWriter(metrics, enabled=True, tensorboard_dir=tb)
    for step in (1, 2, 3):
        writer.write(_row(step, 10.0 - step))
    writer.close()
    # the run resumes from the checkpoint of step 2: step 3 is computed again (new values)
    writer = MetricsWriter(metrics, enabled=True, resume_step=2, tensorboard_dir=tb)
    for step in (3, 4):
        writer.write(_row(step, 20.0 - step))
    writer.close()
    got = _scalars(tb)
    assert got["train/loss"] == {1: 9.0, 2: 8.0, 3: 17.0, 4: 16.0}
    assert got["train/grad_norm"] == {1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0}
    assert got["train/tokens_per_s"] == {1: 101.0, 2: 102.0, 3: 103.0, 4: 104.0}
    for group, peak in (("default", 1e-3), ("vision.layer0", 1e-5)):
        for step, value in got[f"lr/{group}"].items():
            assert math.isclose(value, peak / step, rel_tol=1e-6)
    assert "train/mfu" not in got  # None (unknown peak) is no scalar
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]


def test_without_tensorboard_one_info_line_and_metrics_still_written(tmp_path, monkeypatch,
                                                                     caplog):
    # None in sys.modules makes `import torch.utils.tensorboard` raise ImportError, as when the
    # tensorboard package is not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    tb = str(tmp_path / "tensorboard")
    with caplog.at_level(logging.INFO, logger="mindspeed_vita.training.metrics"):
        writer = MetricsWriter(str(tmp_path / "metrics.jsonl"), enabled=True, tensorboard_dir=tb)
        writer.write(_row(1, 5.0))
        writer.close()
    lines = [r for r in caplog.records if "tensorboard" in r.getMessage().lower()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert not os.path.exists(tb)
    assert read_metrics(str(tmp_path / "metrics.jsonl"))[0]["loss"] == 5.0


def test_train_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tests.training.train_helpers import rows, run, synthetic_data, train_command

    data = synthetic_data(str(tmp_path / "synth"))
    run_dir = str(tmp_path / "run")
    run(train_command(data, run_dir, ["training.train_iters=2"]))
    got = _scalars(os.path.join(run_dir, "tensorboard"))
    expected = rows(run_dir)
    assert sorted(got["train/loss"]) == [1, 2]
    for row in expected:
        assert math.isclose(got["train/loss"][row["step"]], row["loss"], rel_tol=1e-6)
        assert math.isclose(got["train/grad_norm"][row["step"]], row["grad_norm"],
                            rel_tol=1e-6)
        for group, lr in row["lr"].items():  # demo stage 2: the ViT depths have their own lr
            assert math.isclose(got[f"lr/{group}"][row["step"]], lr, rel_tol=1e-6)
    assert len(expected[0]["lr"]) > 1
    assert sorted(got["train/tokens_per_s"]) == [1, 2]
