"""`mindspeed-vita` command line: one entry point, one subcommand per capability.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Rules every command follows (tests/cli/test_every_command.py walks the parser and checks them):

* importing a command module is cheap (standard library, yaml at most): torch, megatron and
  transformers are imported inside `run`, so `--help` and argument errors are instant; only the
  module of the command being run is imported at all;
* expected failures (bad argument, unavailable backend, bad config, bad data, bad checkpoint)
  print exactly one line `mindspeed-vita: error: ...` on stderr and exit 2, without a traceback;
* third-party warnings that say nothing to our user are logged at DEBUG (`--verbose` shows
  them), never printed before our own messages (`mindspeed_vita.startup`);
* every flag shows its default in `--help`; a flag that sets a config value has the key's name.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

PROG = "mindspeed-vita"

# (command, module, help); nested groups are (group, [(command, module, help), ...], help)
COMMANDS: List[Tuple] = [
    ("env", "mindspeed_vita.commands.env", "show the selected backend and library versions"),
    ("config", "mindspeed_vita.commands.config", "validate a stage config and print it resolved"),
    ("train", "mindspeed_vita.training.cli",
     "train one stage from its config (same command again resumes)"),
    ("demo", "mindspeed_vita.commands.demo",
     "build the tiny demo (data, tokenizer, model) and run it"),
    ("infer", "mindspeed_vita.inference.cli", "generate from a checkpoint (native or HF directory)"),
    ("serve", "mindspeed_vita.inference.serve_cli", "OpenAI-compatible HTTP server for a checkpoint"),
    ("eval", "mindspeed_vita.eval.cli", "run lmms-eval tasks on a checkpoint (extra [eval])"),
    ("convert", [
        ("import-hf", "mindspeed_vita.convert.cli_import", "HF checkpoint -> native checkpoint"),
        ("export-hf", "mindspeed_vita.convert.cli_export", "native checkpoint -> HF InternVL directory"),
    ], "convert checkpoints between HF and the native format"),
    ("data", [
        ("inspect", "mindspeed_vita.commands.data_inspect",
         "count samples, tokens, tiles, rejections, packing"),
        ("synth", "mindspeed_vita.data.synth_cli", "write the synthetic demo dataset"),
        ("convert-mixture", "mindspeed_vita.data.release_mixture",
         "the Long-VITA release's mixture YAML -> a mixture YAML"),
    ], "data tools"),
    ("bench", [
        ("attention", "mindspeed_vita.commands.bench_attention",
         "backend attention vs naive PyTorch"),
        ("lm-head", "mindspeed_vita.commands.bench_lm_head",
         "full vs chunked vs logits-masked LM head"),
        ("data", "mindspeed_vita.commands.bench_data",
         "render + pack throughput and packing utilisation"),
        ("ring", "mindspeed_vita.commands.bench_ring",
         "zigzag ring attention: balance, memory, overlap"),
        ("decode", "mindspeed_vita.commands.bench_decode",
         "KV-cache CP decode vs the paper's fixed-length decode: tokens/s"),
        ("prefill", "mindspeed_vita.commands.bench_prefill",
         "CP prefill: peak memory per rank, longest prompt per LM head in a budget"),
        ("train", "mindspeed_vita.commands.bench_train",
         "our training step vs transformers' InternVL, packed vs padded: tokens/s"),
    ], "benchmarks that print ratios against a baseline measured in the same run"),
]


class CommandLineError(Exception):
    """A bad command line (argparse's complaint), printed as one error line, exit 2."""


class _Exit(Exception):
    """argparse asked to exit (after --help or --version) with this status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or default is None
                or default is False or default == [] or default is argparse.SUPPRESS
                or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting (see `main`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise CommandLineError(f"{message} (see `{self.prog} --help`)")

    def exit(self, status: int = 0, message: Optional[str] = None):
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


class _LazyCommand:
    """Defers importing a command module until its parser or runner is needed."""

    def __init__(self, module: str):
        self.module = module

    def load(self):
        return importlib.import_module(self.module)


def _add_verbose(parser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug log, third-party warnings included")


def _add(subparsers, name: str, module: str, help_text: str, load: bool) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    cmd = _LazyCommand(module)
    parser.set_defaults(_command=cmd)
    _add_verbose(parser)
    if load:  # only the command being run imports its module to add its arguments
        cmd.load().add_arguments(parser)


def selected_path(argv: Sequence[str]) -> Tuple[str, ...]:
    """The command (and subcommand) named by `argv`: its leading non-option words."""
    words = []
    for token in argv:
        if token.startswith("-"):
            if words:
                break
            continue  # a global option before the command
        words.append(token)
        if len(words) == 2:
            break
    return tuple(words)


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser. With `argv`, only the selected command's arguments are added (its module
    imported); with None, every command's (for tests and documentation)."""
    from mindspeed_vita import __version__

    path = selected_path(argv) if argv is not None else None
    parser = Parser(
        prog=PROG,
        description="Train and serve Long-VITA-style long-context VLMs on Ascend NPU, NVIDIA GPU "
                    "or CPU.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_verbose(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, target, help_text in COMMANDS:
        if isinstance(target, str):
            _add(sub, name, target, help_text, path is None or path[:1] == (name,))
            continue
        group = sub.add_parser(name, help=help_text, description=help_text)
        inner = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                     parser_class=Parser)
        group.set_defaults(_group=group)
        for sub_name, module, sub_help in target:
            _add(inner, sub_name, module, sub_help, path is None or path[:2] == (name, sub_name))
    return parser


def iter_commands(parser: argparse.ArgumentParser, prefix: Tuple[str, ...] = ()
                  ) -> Iterator[Tuple[Tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command of `parser` as (words, its parser), groups expanded."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    yield from iter_commands(child, prefix + (name,))
                else:
                    yield prefix + (name,), child


def _expected_errors() -> tuple:
    from mindspeed_vita.errors import UserInputError

    errors = [UserInputError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
              FileExistsError, PermissionError]
    if "backends.base" in sys.modules:  # imports torch: only present when a backend was used
        errors.append(sys.modules["backends.base"].BackendUnavailableError)
    try:  # needs pydantic; a torch-only host (the GPU job's) must still get the one-line error
        from mindspeed_vita.config.schema import ConfigError
    except ImportError:
        return tuple(errors)
    return tuple(errors + [ConfigError])


def error_line(error: BaseException) -> str:
    """The one-line message of an expected error (an OSError names its file)."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror.lower()}"
    else:
        text = str(error)
    lines = (line.strip() for line in text.splitlines() if line.strip())
    return f"{PROG}: error: " + "; ".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `mindspeed-vita` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    except CommandLineError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except _Exit as e:
        return e.status
    cmd = getattr(args, "_command", None)
    if cmd is None:
        group = getattr(args, "_group", None)
        where = group.prog if group is not None else PROG
        print(f"{PROG}: error: {where}: name a command (see `{where} --help`)", file=sys.stderr)
        return 2
    from mindspeed_vita import startup

    startup.prepare(verbose=getattr(args, "verbose", False))
    try:
        return int(cmd.load().run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _expected_errors()):
            raise
        print(error_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
