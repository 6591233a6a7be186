"""`mindspeed-vita train CONFIG [key=value ...]`: train one stage (one process, or under torchrun).

`key=value` overrides any config key (`training.save=runs/s1 training.train_iters=100`). The
same command run again resumes from the latest checkpoint in `training.save`. `shell/train.sh`
is this command under torchrun with the platform's environment.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    """Arguments of `train`."""
    parser.add_argument("config", metavar="CONFIG", help="stage YAML (e.g. configs/stages/stage1.yaml)")
    parser.add_argument("overrides", metavar="key=value", nargs="*",
                        help="config overrides, e.g. training.save=runs/stage1")
    parser.add_argument("--backend", default=None, help="auto | npu | cuda | cpu (default: config)")


def run(args) -> int:
    """Validate, plan and train; expected failures are one line with exit code 2 (cli.py)."""
    from mindspeed_vita.config.loader import load_config
    from mindspeed_vita.training.trainer import TrainingStopped, run_training

    stage = load_config(args.config, args.overrides)
    try:
        summary = run_training(stage, backend_name=args.backend)
    except TrainingStopped as stopped:
        print(f"mindspeed-vita: training stopped: {stopped}", flush=True)
        return 1
    return 0 if summary["finished"] else 143
