"""Multi-process training on CPU/gloo: two nodes simulated by two `shell/train.sh` launches
equal one node with two processes; a checkpoint written at DP 2 or TP 2 resumes at 1 process."""
import json
import os
import shutil
import subprocess

import pytest

from tests.dist_utils import free_port
from tests.training.train_helpers import REPO, env, rows, run, synthetic_data, train_command

STEPS = ["training.train_iters=3", "training.save_interval=2", "training.keep_last=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(str(tmp_path_factory.mktemp("synth")))


def _train_sh(data, run_dir, overrides, **variables):
    args = train_command(data, run_dir, [*STEPS, *overrides])[4:]  # CONFIG key=value ...
    return subprocess.Popen(["bash", os.path.join(REPO, "shell", "train.sh"), *args],
                            env={**env(), **{k: str(v) for k, v in variables.items()}},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait(procs, timeout=600):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.fixture(scope="module")
def one_node_dp2(data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("one-node") / "run")
    _wait([_train_sh(data, run_dir, [], NPROC_PER_NODE=2, MASTER_PORT=free_port())])
    return run_dir


def test_two_nodes_equal_one_node(data, one_node_dp2, tmp_path):
    run_dir, port = str(tmp_path / "run"), free_port()
    nodes = [_train_sh(data, run_dir, [], NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, NPROC_PER_NODE=1) for rank in (0, 1)]
    out = _wait(nodes)
    assert "nodes=2" in out[0] and "over 2 dp" in out[0]
    expected = rows(one_node_dp2)
    assert [r["step"] for r in expected] == [1, 2, 3]
    assert rows(run_dir) == expected


def _resume_from_step_2(source_run, target):
    """A copy of `source_run` whose latest checkpoint is step 2 (as if it was killed)."""
    shutil.copytree(source_run, target)
    shutil.rmtree(os.path.join(target, "iter_0000003"))
    with open(os.path.join(target, "latest"), "w") as f:
        f.write("iter_0000002\n")


def _trained(order, state):
    """Stream positions a dp rank's pipeline state trained on (consumed, not held)."""
    from mindspeed_vita.data.stream_order import held_positions

    size, rank, held = state["dp_size"], state["dp_rank"], set(held_positions(state["packer"]))
    index = [rank + size * k for k in range(state["consumed"]) if k not in held]
    return set(int(p) for p in order.positions(index))


def test_dp2_checkpoint_resumes_on_one_process(data, one_node_dp2, tmp_path):
    """DP 2 -> 1: model and optimizer reshard, and the data continues the global sample
    stream: the samples the two ranks had read but not trained on come first, then the stream
    after their frontier - none trained twice, none lost."""
    import torch

    from mindspeed_vita.data.stream_order import StreamOrder

    target = str(tmp_path / "run")
    _resume_from_step_2(one_node_dp2, target)
    out = run(train_command(data, target, STEPS)).stdout
    assert "resuming from" in out and "resharded" in out
    assert "data position:" in out and "none repeated, none lost" in out
    resumed = rows(target)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == rows(one_node_dp2)[:2]

    def load(step, name):
        return torch.load(os.path.join(target, f"iter_{step:07d}", name), weights_only=False)

    old = [load(2, f"data_dp_{r:05d}.pt") for r in (0, 1)]
    assert {s["dp_size"] for s in old} == {2} and min(s["consumed"] for s in old) > 0
    trained_before = set().union(*(_trained(StreamOrder(), s) for s in old))
    frontier = max(r + 2 * (s["consumed"] - 1) + 1 for r, s in enumerate(old))
    not_trained = sorted(set(range(frontier)) - trained_before)
    with open(os.path.join(target, "iter_0000003", "training.json")) as f:
        order = StreamOrder.from_state(json.load(f)["data_order"])
    # brute force against the trainer's order: the untrained ones first, then the frontier on
    assert list(order.carry) == not_trained and order.frontier == frontier and not_trained
    new = load(3, "data_dp_00000.pt")
    assert new["dp_size"] == 1 and new["consumed"] > 0
    trained_after = _trained(order, new)
    assert trained_after and not trained_after & trained_before


@pytest.mark.heavy
def test_tp2_checkpoint_resumes_at_tp1_with_the_same_loss(data, tmp_path):
    tp2 = str(tmp_path / "tp2")
    run(train_command(data, tp2, [*STEPS, "parallel.tp=2"], nproc=2))
    target = str(tmp_path / "tp1")
    _resume_from_step_2(tp2, target)
    out = run(train_command(data, target, STEPS)).stdout
    assert "resharded" in out
    # same data position (dp 1 both), same weights and Adam state: step 3 is the TP 2 step 3
    a, b = rows(tp2)[2], rows(target)[2]
    assert a["step"] == b["step"] == 3 and a["tokens"] == b["tokens"]
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"])


def test_uneven_micro_batches_run_the_whole_global_batch(data, tmp_path):
    """A global batch of 3 micro batches on dp 2: rank 0 runs two per step, rank 1 one, and the
    trainer says so. Each step's label tokens are those of exactly these micro batches: rank 0's
    next two rows and rank 1's next one, rebuilt here from the same config."""
    import functools

    from mindspeed_vita.config.loader import load_config
    from mindspeed_vita.data.loader import pipeline_from_config
    from mindspeed_vita.data.render import render_sample
    from mindspeed_vita.data.tokenizer import load_tokenizer
    from mindspeed_vita.training.step import label_count

    run_dir = str(tmp_path / "run")
    overrides = ["training.train_iters=2", "training.global_batch_size=3"]
    command = train_command(data, run_dir, overrides, nproc=2)
    out = run(command).stdout
    assert "3 micro batches do not divide over dp 2: dp rank 0 runs 2 per step, the others 1" \
        in out, out[-3000:]
    got = rows(run_dir)
    assert [r["step"] for r in got] == [1, 2]

    stage = load_config(command[command.index("train") + 1],
                        command[command.index("train") + 2:])
    tokenizer = load_tokenizer(stage.model.tokenizer)
    render = functools.partial(render_sample, tokenizer=tokenizer, model_cfg=stage.model,
                               max_num_frame=stage.data.max_num_frame,
                               max_images=stage.data.max_images,
                               max_frames=stage.data.max_frames)
    batches = [iter(pipeline_from_config(stage, render_fn=render, pad_id=tokenizer.pad_id,
                                         context_token_ids=tokenizer.context_token_ids,
                                         dp_rank=rank, dp_size=2)) for rank in (0, 1)]
    for row in got:
        micro = [next(batches[0]), next(batches[0]), next(batches[1])]
        assert row["label_tokens"] == sum(label_count(b) for b in micro), row
        assert row["loss"] is not None and row["skipped"] is None
