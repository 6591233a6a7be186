"""`mindspeed-vita train CONFIG [key=value ...]`: train one stage (one process, or under torchrun).

`key=value` overrides any config key (`training.save=runs/s1 training.train_iters=100`). The
same command run again resumes from the latest checkpoint in `training.save`. `shell/train.sh`
is this command under torchrun with the platform's environment.
"""
from __future__ import annotations

import os

#: exit status when too many steps in a row were skipped for a non-finite loss / grad norm
EXIT_STOPPED = 3
#: exit status after SIGTERM (128 + 15, as a shell reports a process the signal ended)
EXIT_SIGTERM = 143
EXIT_STATUS = f"""exit status:
  0    the stage finished (train_iters steps; final checkpoint in training.save if set)
  2    bad configuration or launch environment (one error line, nothing computed)
  {EXIT_STOPPED}    stopped: 'training.max_skipped_in_a_row' steps in a row had a NaN/inf loss or
       gradient norm (their updates were skipped); a checkpoint of that step is saved
  {EXIT_SIGTERM}  SIGTERM: the current step's checkpoint is saved; the same command resumes
  (under torchrun, torchrun itself exits 1 when a worker exits non-zero)"""


def add_arguments(parser) -> None:
    """Arguments of `train`."""
    parser.add_argument("config", metavar="CONFIG", help="stage YAML (e.g. configs/stages/stage1.yaml)")
    parser.add_argument("overrides", metavar="key=value", nargs="*",
                        help="config overrides, e.g. training.save=runs/stage1")
    parser.add_argument("--backend", default=None, help="auto | npu | cuda | cpu (default: config)")
    parser.epilog = EXIT_STATUS


def run(args) -> int:
    """Validate, plan and train; expected failures are one line with exit code 2 (cli.py)."""
    from mindspeed_vita.config.loader import load_config
    from mindspeed_vita.training.trainer import TrainingStopped, run_training

    stage = load_config(args.config, args.overrides)
    try:
        summary = run_training(stage, backend_name=args.backend)
    except TrainingStopped as stopped:
        if int(os.environ.get("RANK", "0")) == 0:  # one message per run, not one per rank
            print(f"mindspeed-vita: training stopped: {stopped}", flush=True)
        return EXIT_STOPPED
    return 0 if summary["finished"] else EXIT_SIGTERM
