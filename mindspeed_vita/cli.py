"""`mindspeed-vita` command line: one entry point, one subcommand per capability.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their command runs, so `--help` is instant and a command never
pays for another's imports. Expected failures (unavailable backend, bad config, bad data, bad
checkpoint) print one line `mindspeed-vita: error: ...` and exit non-zero, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence, Tuple

# (command, module, help); nested groups are (group, [(command, module, help), ...], help)
COMMANDS: List[Tuple] = [
    ("env", "mindspeed_vita.commands.env", "show the selected backend and library versions"),
    ("config", "mindspeed_vita.commands.config", "validate a stage config and print it resolved"),
    ("demo", "mindspeed_vita.demo.run", "build the tiny demo (data, tokenizer, model) and run it"),
    ("infer", "mindspeed_vita.inference.cli", "generate from a checkpoint (native or HF directory)"),
    ("serve", "mindspeed_vita.inference.serve_cli", "OpenAI-compatible HTTP server for a checkpoint"),
    ("eval", "mindspeed_vita.eval.cli", "run lmms-eval tasks on a checkpoint (extra [eval])"),
    ("convert", [
        ("import-hf", "mindspeed_vita.convert.cli_import", "HF checkpoint -> native checkpoint"),
        ("export-hf", "mindspeed_vita.convert.cli_export", "native checkpoint -> HF InternVL directory"),
    ], "convert checkpoints between HF and the native format"),
    ("data", [
        ("inspect", "mindspeed_vita.data.inspect", "count samples, tokens, tiles, rejections, packing"),
        ("synth", "mindspeed_vita.data.synth_cli", "write the synthetic demo dataset"),
        ("convert-mixture", "mindspeed_vita.data.release_mixture",
         "the Long-VITA release's mixture YAML -> a mixture YAML"),
    ], "data tools"),
    ("bench", [
        ("attention", "mindspeed_vita.bench.attention", "backend attention vs naive PyTorch"),
        ("lm-head", "mindspeed_vita.bench.lm_head", "full vs chunked vs logits-masked LM head"),
        ("data", "mindspeed_vita.bench.data", "render + pack throughput and packing utilisation"),
    ], "benchmarks that print ratios against a baseline measured in the same run"),
]


class _LazyCommand:
    """Defers importing a command module until its parser or runner is needed."""

    def __init__(self, module: str):
        self.module = module

    def load(self):
        return importlib.import_module(self.module)


def _add(subparsers, name: str, module: str, help_text: str, argv: Sequence[str]) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    cmd = _LazyCommand(module)
    parser.set_defaults(_command=cmd)
    # Only the command being run imports its module to add its arguments.
    if name in argv:
        cmd.load().add_arguments(parser)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser (arguments of the selected command only, to keep startup fast)."""
    parser = argparse.ArgumentParser(
        prog="mindspeed-vita",
        description="Train and serve Long-VITA-style long-context VLMs on Ascend NPU, NVIDIA GPU or CPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target, help_text in COMMANDS:
        if isinstance(target, str):
            _add(sub, name, target, help_text, argv)
            continue
        group = sub.add_parser(name, help=help_text, description=help_text)
        inner = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        group.set_defaults(_group=group)
        for sub_name, module, sub_help in target:
            _add(inner, sub_name, module, sub_help, argv if name in argv else ())
    return parser


def _expected_errors() -> tuple:
    from backends.base import BackendUnavailableError
    from mindspeed_vita.errors import UserInputError

    errors = (BackendUnavailableError, UserInputError, FileNotFoundError)
    try:  # needs pydantic; a torch-only host (the GPU job's) must still get the one-line error
        from mindspeed_vita.config.schema import ConfigError
    except ImportError:
        return errors
    return errors + (ConfigError,)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `mindspeed-vita` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    cmd = getattr(args, "_command", None)
    if cmd is None:
        (getattr(args, "_group", None) or parser).print_help()
        return 2
    try:
        return int(cmd.load().run(args) or 0)
    except _expected_errors() as e:
        print(f"mindspeed-vita: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mindspeed-vita: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
