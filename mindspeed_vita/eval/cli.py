"""`mindspeed-vita eval`: run lmms-eval on a checkpoint with the `mindspeed_vita` model.

A thin entry: it registers the model in lmms-eval's registry (so a source checkout works
without the installed entry point) and hands lmms-eval its own command line::

    mindspeed-vita eval --checkpoint DIR --tasks mme,my_task --include-path tasks/ \\
        --limit 20 --output-path results/

is `python -m lmms_eval --model mindspeed_vita --model_args checkpoint=DIR,... --tasks ...`;
under `torchrun --nproc_per_node N --no-python mindspeed-vita eval --cp C ...` each block of C
processes runs the context-parallel model (see `eval.exchange`).
Anything else lmms-eval accepts goes in one string: `--lmms-args="--log_samples --verbosity DEBUG"`.
"""
from __future__ import annotations

import shlex
import sys


def add_arguments(parser) -> None:
    """Arguments of `mindspeed-vita eval`."""
    parser.add_argument("--checkpoint", required=True,
                        help="native checkpoint, HF InternVL or Long-VITA release directory")
    parser.add_argument("--tasks", required=True, help="lmms-eval task names, comma separated")
    parser.add_argument("--include-path", default=None,
                        help="directory of extra lmms-eval task YAMLs (local tasks)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (a sample)")
    parser.add_argument("--output-path", default=None, help="where lmms-eval writes results")
    parser.add_argument("--backend", default=None, help="auto | npu | cuda | cpu")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length when a task sets none (model default 256)")
    from mindspeed_vita.commands.argtypes import positive_int

    parser.add_argument("--cp", type=positive_int, default=None,
                        help="context-parallel size: launch under torchrun with cp x tp x "
                             "replicas processes (each cp x tp block runs one request at a "
                             "time, the replicas share the documents)")
    parser.add_argument("--tp", type=positive_int, default=None, help="tensor-parallel size (see --cp)")
    parser.add_argument("--dtype", default=None,
                        help="override the checkpoint's params dtype (e.g. float32 on CPU)")
    parser.add_argument("--model-args", default="",
                        help="more key=value model arguments, comma separated")
    parser.add_argument("--lmms-args", default="",
                        help="more lmms-eval flags as one string "
                             "(e.g. --lmms-args=\"--log_samples\")")


def lmms_eval_argv(args) -> list:
    """lmms-eval's command line for `args` (what `python -m lmms_eval` would be given)."""
    model_args = [f"checkpoint={args.checkpoint}"]
    for key, value in (("backend", args.backend), ("max_new_tokens", args.max_new_tokens),
                       ("cp", args.cp), ("tp", args.tp), ("dtype", args.dtype)):
        if value is not None:
            model_args.append(f"{key}={value}")
    if args.model_args:
        model_args.append(args.model_args)
    argv = ["--model", "mindspeed_vita", "--model_args", ",".join(model_args),
            "--tasks", args.tasks, "--batch_size", "1"]
    for flag, value in (("--include_path", args.include_path), ("--limit", args.limit),
                        ("--output_path", args.output_path)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + shlex.split(args.lmms_args)


def run(args) -> int:
    """Register the model and run lmms-eval's evaluation. Returns 0."""
    from mindspeed_vita.errors import UserInputError
    from mindspeed_vita.eval.registration import INSTALL_HINT, register

    try:
        from lmms_eval.cli import dispatch
    except ImportError as exc:
        raise UserInputError(f"{INSTALL_HINT} ({exc})") from None
    register()
    saved = sys.argv
    sys.argv = ["lmms-eval"] + lmms_eval_argv(args)
    try:
        dispatch.main()
    finally:
        sys.argv = saved
    return 0
