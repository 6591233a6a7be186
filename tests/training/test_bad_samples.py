"""A bad sample never stops a run: a `train` run over a mixture with corrupted images skips
each sample that uses one, counts it in metrics.jsonl (`skipped_samples`) and keeps training.
The count is checked exactly against the stream positions the run consumed."""
import json
import os
import shutil

import pytest

from tests.training.train_helpers import rows, run, synthetic_data, train_command


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(str(tmp_path_factory.mktemp("synth")))


def _corrupt_images(root, pattern="single_", every=5):
    """Truncate every `every`-th image whose name starts with `pattern` to its first 40 bytes
    (a PNG header PIL opens lazily and then fails to decode); returns their absolute paths."""
    images = os.path.join(root, "images")
    corrupted = set()
    for name in sorted(n for n in os.listdir(images) if n.startswith(pattern))[::every]:
        path = os.path.join(images, name)
        with open(path, "rb") as f:
            head = f.read(40)
        with open(path, "wb") as f:
            f.write(head)
        corrupted.add(os.path.normpath(path))
    return corrupted


def _uses_corrupted(stage_yaml, data_seed, consumed, corrupted):
    """How many of the first `consumed` stream positions are records with a corrupted image."""
    import numpy as np

    from mindspeed_vita.data.mixture import MixtureConfig, MixtureStream

    stream = MixtureStream(MixtureConfig.from_yaml(stage_yaml), seed=data_seed)
    count = 0
    for item in stream.items(np.arange(consumed)):
        raw = stream.read(item.source_idx, item.line_idx)
        images = json.loads(raw.text).get("images", [])
        count += any(os.path.normpath(os.path.join(raw.root, i)) in corrupted for i in images)
    return count


def test_corrupted_images_are_skipped_and_counted(data, tmp_path):
    from mindspeed_vita.config.loader import load_config

    root = str(tmp_path / "data")
    shutil.copytree(data["root"], root)
    corrupted = _corrupt_images(root)
    assert len(corrupted) >= 5
    broken = dict(data, root=root, stage2=os.path.join(root, "stage2.yaml"))
    run_dir = str(tmp_path / "run")
    cmd = train_command(broken, run_dir, ["training.train_iters=3"])
    result = run(cmd)
    got = rows(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert all(r["loss"] is not None and r["skipped_steps"] == 0 for r in got)
    skipped = [r["skipped_samples"] for r in got]
    assert skipped == sorted(skipped) and skipped[-1] > 0, skipped
    assert "skipped sample (corrupt_image)" in result.stderr
    # exact: every consumed position whose record has a corrupted image, and nothing else
    import torch

    state = torch.load(os.path.join(run_dir, "iter_0000003", "rank_00000.pt"),
                       weights_only=False)
    assert state["data"]["rejected"] == {"corrupt_image": skipped[-1]}
    stage = load_config(cmd[4], cmd[5:])
    assert _uses_corrupted(broken["stage2"], stage.data.seed, state["data"]["consumed"],
                           corrupted) == skipped[-1]
