"""A NaN/inf loss or gradient norm skips the update: parameters, optimizer state and schedule
are bit-identical after the skipped step, and the next step trains again. On 2 gloo processes
the fault is injected on rank 1 only and both ranks must skip (they agree through the
reductions), or the replicas would diverge. Built from the trainer's own pieces (megatron DDP,
distributed optimizer, scheduler, `train_step`), tiny model, fp32."""
import json
import os

import pytest
import torch
import yaml

from tests.dist_utils import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTEXT_ID = 1000
TOKENS_PER_TILE = 4  # tiny.yaml: 56 px tiles, pixel shuffle 0.5
SEQ = 32


def _batch(seed):
    from mindspeed_vita.models.inputs import batch_from_tensors

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 900, (1, SEQ), generator=gen)
    ids[0, 2:2 + TOKENS_PER_TILE] = CONTEXT_ID
    labels = torch.randint(0, 900, (1, SEQ), generator=gen)
    labels[ids == CONTEXT_ID] = -100
    batch = batch_from_tensors(ids, torch.arange(SEQ)[None], torch.randn(1, 3, 56, 56,
                                                                          generator=gen), labels)
    batch.num_real_tokens = SEQ
    return batch


def _trainer_pieces(world_size, dtype=torch.float32):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from backends import get_backend
    from mindspeed_vita.config.model import ModelConfig
    from mindspeed_vita.config.schema import TrainingConfig
    from mindspeed_vita.models.vlm import LongVitaModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel
    from mindspeed_vita.training.optimizer import (
        apply_freezing, build_optimizer, build_scheduler)

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(dp=world_size), seed=5)
    with open(os.path.join(REPO, "configs", "model", "tiny.yaml")) as f:
        cfg = ModelConfig.model_validate(dict(yaml.safe_load(f),
                                              params_dtype=str(dtype).split(".")[1]))
    training = TrainingConfig(lr=1e-3, train_iters=10, warmup_fraction=0.0, clip_grad=1.0,
                              trainable=["vision", "projector", "language"])
    model = LongVitaModel(cfg, backend, groups=groups, context_token_ids=[CONTEXT_ID])
    apply_freezing(model, training.trainable)
    ddp = DistributedDataParallel(model.language.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    optimizer = build_optimizer(ddp, training, params_dtype=dtype,
                                num_vision_layers=cfg.vision.num_layers, distributed=True)
    return groups, model, ddp, optimizer, build_scheduler(optimizer, training)


def _snapshot(model, optimizer, scheduler):
    """Every tensor of the training state (model, fp32 main params, Adam state) + the schedule."""
    state = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, sub in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        for g, group in enumerate(sub.optimizer.param_groups):
            for j, param in enumerate(group["params"]):
                state[f"main.{i}.{g}.{j}"] = param.detach().clone()
                for key, value in sub.optimizer.state[param].items():
                    state[f"adam.{i}.{g}.{j}.{key}"] = torch.as_tensor(value).clone()
    return state, scheduler.num_steps


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _skip_body(rank, world_size, dtype=torch.float32):
    """normal step, NaN loss, normal step, inf gradient, normal step; the faults only on the
    last rank. Per fault: did every rank skip, was the state untouched, did the next step
    train."""
    from mindspeed_vita.parallel.process_groups import destroy_parallel
    from mindspeed_vita.training.step import train_step

    groups, model, ddp, optimizer, scheduler = _trainer_pieces(world_size, dtype)
    try:
        def step(seed, kind=None):
            poison = rank == world_size - 1
            return train_step(model=model, ddp_model=ddp, optimizer=optimizer,
                              scheduler=scheduler, batches=[_batch(seed + rank)], groups=groups,
                              poison_loss=poison and kind == "loss",
                              poison_grad=poison and kind == "grad")

        # a normal step first: the Adam state exists and must survive the skips
        first = step(10)
        out = {"first": (first.skipped, first.loss)}
        for i, kind in enumerate(("loss", "grad")):
            before, steps_before = _snapshot(model, optimizer, scheduler)
            skipped = step(20 + i, kind)
            after, steps_after = _snapshot(model, optimizer, scheduler)
            resumed = step(30 + i)
            trained, _ = _snapshot(model, optimizer, scheduler)
            out[kind] = {"skipped": (skipped.skipped, skipped.skip_reason),
                         "grad_norm": skipped.grad_norm,
                         "unchanged": _same(before, after) and steps_before == steps_after,
                         "resumed": (resumed.skipped, resumed.loss),
                         "changed": not _same(after, trained)}
        out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return out
    finally:
        destroy_parallel()


REASONS = {"loss": "non-finite loss", "grad": "non-finite gradient norm"}


def _check(results):
    import math

    for r in results:
        assert r["first"][0] is False and math.isfinite(r["first"][1])
        for kind, reason in REASONS.items():
            got = r[kind]
            assert got["skipped"] == (True, reason), kind
            assert not math.isfinite(got["grad_norm"]), kind
            assert got["unchanged"], f"a skipped step ({kind}) changed the model, optimizer " \
                                     f"or schedule"
            assert got["resumed"][0] is False and math.isfinite(got["resumed"][1]), kind
            assert got["changed"], f"the step after the skip ({kind}) did not train"
    for other in results[1:]:  # the replicas stayed identical
        assert _same(results[0]["params"], other["params"])


def test_nonfinite_step_is_skipped_on_one_process():
    _check(run_distributed(_skip_body, world_size=1))


def test_nonfinite_step_is_skipped_with_bf16_params():
    """bf16 with fp32 main weights: megatron has no grad scaler there, so nothing of its own
    would catch an inf gradient (the clip would write NaN into every weight)."""
    _check(run_distributed(_skip_body, world_size=1, args=(torch.bfloat16,)))


def test_nonfinite_on_one_rank_is_skipped_by_both_ranks():
    _check(run_distributed(_skip_body, world_size=2))


# ------------------------------------------------------------------ a real `train` run
def _tensors_of(checkpoint, tmp):
    """Every tensor of a checkpoint's megatron state (model + optimizer), the optimizer's
    common state (param groups) and the schedule of rank 0."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = os.path.join(tmp, os.path.basename(checkpoint) + ".pt")
    dcp_to_torch_save(os.path.join(checkpoint, "dist"), flat)
    common = torch.load(os.path.join(checkpoint, "dist", "common.pt"), weights_only=False)
    rank0 = torch.load(os.path.join(checkpoint, "rank_00000.pt"), weights_only=False)
    return torch.load(flat, weights_only=False), repr(common), rank0["scheduler"]


def test_train_run_skips_counts_and_stops(tmp_path):
    """1 process: NaN loss at step 2, inf gradient at steps 4 and 5 with a limit of 2 in a
    row: step 3 trains, the run stops after step 5 with exit code 3, one message and a
    checkpoint equal (model, Adam state, schedule) to step 3's; the same command without the
    faults resumes from it and finishes."""
    import subprocess

    from tests.training.train_helpers import REPO as ROOT
    from tests.training.train_helpers import env, rows, run, synthetic_data, train_command

    data = synthetic_data(str(tmp_path / "synth"))
    run_dir = str(tmp_path / "run")
    base = ["training.train_iters=6", "training.save_interval=3", "training.keep_last=2",
            "training.max_skipped_in_a_row=2"]
    faults = ["training.fault_injection.nonfinite_loss_steps=[2]",
              "training.fault_injection.nonfinite_grad_steps=[4,5]"]
    result = subprocess.run(train_command(data, run_dir, base + faults), env=env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, (result.returncode, result.stdout[-3000:],
                                    result.stderr[-3000:])
    stopped = [line for line in result.stdout.splitlines() if "training stopped" in line]
    assert len(stopped) == 1 and "'training.max_skipped_in_a_row' = 2" in stopped[0], stopped
    assert "iter_0000005" in stopped[0]
    assert "SKIPPED (non-finite loss, no update)" in result.stdout
    assert "SKIPPED (non-finite gradient norm, no update)" in result.stdout
    got = rows(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in got] == [0, 1, 1, 2, 3]
    # strict JSON: the non-finite loss / gradient norm of a skipped step is null
    assert [r["loss"] is not None for r in got] == [True, False, True, True, True]
    assert [r["grad_norm"] is not None for r in got] == [True, False, True, False, False]
    assert [r["skipped"] for r in got] == [None, "non-finite loss", None,
                                           "non-finite gradient norm", "non-finite gradient norm"]
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:  # a strict parser (no NaN/Infinity literals) reads every line
            json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert open(os.path.join(run_dir, "latest")).read().strip() == "iter_0000005"
    tensors3, common3, schedule3 = _tensors_of(os.path.join(run_dir, "iter_0000003"), tmp_path)
    tensors5, common5, schedule5 = _tensors_of(os.path.join(run_dir, "iter_0000005"), tmp_path)
    assert any(k.startswith("optimizer.state.exp_avg.") for k in tensors3)
    assert sorted(tensors3) == sorted(tensors5)
    for key, value in tensors3.items():
        other = tensors5[key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    assert common3 == common5 and schedule3 == schedule5

    out = run(train_command(data, run_dir, base)).stdout
    assert "resuming from" in out and "iter_0000005" in out
    final = rows(run_dir)
    assert [r["step"] for r in final] == [1, 2, 3, 4, 5, 6]
    assert final[-1]["skipped_steps"] == 3 and final[-1]["loss"] is not None


def test_train_on_two_processes_skips_when_one_rank_is_nonfinite(tmp_path):
    """torchrun, 2 processes (dp 2): a NaN loss at step 2 and an inf gradient at step 3, both
    on rank 1 only. Rank 0 writes the rows: it must have skipped both steps too."""
    from tests.training.train_helpers import rows, run, synthetic_data, train_command

    data = synthetic_data(str(tmp_path / "synth"))
    run_dir = str(tmp_path / "run")
    out = run(train_command(data, run_dir, [
        "training.train_iters=4", "training.fault_injection.rank=1",
        "training.fault_injection.nonfinite_loss_steps=[2]",
        "training.fault_injection.nonfinite_grad_steps=[3]"], nproc=2)).stdout
    got = rows(run_dir)
    assert [r["skipped_steps"] for r in got] == [0, 1, 2, 2]
    assert "step 2/4" in out and "SKIPPED (non-finite loss, no update)" in out
    assert "SKIPPED (non-finite gradient norm, no update)" in out
    assert [r["skipped"] for r in got] == [None, "non-finite loss", "non-finite gradient norm",
                                           None]
    assert got[3]["loss"] is not None and got[3]["grad_norm"] is not None
