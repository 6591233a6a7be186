"""Shared pieces of the trainer's end-to-end tests: synthetic data, the train command, rows."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Sequence

from mindspeed_vita.training.metrics import TIMING_FIELDS, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_STAGE2 = os.path.join(REPO, "configs", "demo", "stage2.yaml")


def synthetic_data(root: str) -> Dict[str, str]:
    """The synthetic demo dataset and tiny tokenizer under `root` (written once)."""
    from mindspeed_vita.data.synth import write_synthetic_dataset
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = os.path.join(root, "tokenizer")
    if not os.path.isdir(tokenizer):
        write_synthetic_dataset(root, seed=0)
        build_tiny_tokenizer(tokenizer)
    return {"root": root, "tokenizer": tokenizer,
            **{f"stage{i}": os.path.join(root, f"stage{i}.yaml") for i in range(1, 5)}}


def env() -> Dict[str, str]:
    e = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", MINDSPEED_VITA_BACKEND="cpu",
             MINDSPEED_VITA_PROGRESS="0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def train_command(data: Dict[str, str], run_dir: str, overrides: Sequence[str] = (), *,
                  nproc: int = 1, config: str = DEMO_STAGE2, stage: str = "stage2") -> List[str]:
    """`mindspeed-vita train` on the synthetic data (under torchrun when nproc > 1); short rows
    and few steps so a run takes seconds."""
    args = [config, f"data.mixture={data[stage]}", f"model.tokenizer={data['tokenizer']}",
            f"training.save={run_dir}", "data.seq_length=1024", "data.num_workers=0",
            *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "mindspeed_vita.cli", "train", *args]
    from tests.dist_utils import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "mindspeed_vita.cli", "train", *args]


def run(cmd: List[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def rows(run_dir: str) -> List[Dict]:
    """metrics.jsonl rows without the wall-clock fields (what must be reproducible)."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
            for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]
