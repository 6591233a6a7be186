"""Progress of slow work (anything that may take more than a few seconds), on stderr, via tqdm.

On a terminal it is tqdm's bar. Anywhere else (a log file, a pipe, a CI console) the bar's
carriage-return redraws would pile up in one unreadable line, so it is a plain line per
`log_interval` seconds instead, with count, percentage, elapsed time, rate and time left:

    [inspect] records: 1200/5000 (24%) 00:10<00:31, 118.2 records/s

The first line (or bar) is printed when the work starts, so something shows within 5 s.

API (for any command, the trainer included):

    from mindspeed_vita.progress import progress, steps

    for record in progress(records, desc="[inspect] records", unit="records"):
        ...                                   # an iterable, total taken from len() or total=

    bar = progress(total=n, desc="[bench data] samples", unit="samples")
    bar.update(k)                             # manual counting; bar.close() when done
    with progress(total=n, desc=...) as bar:  # or as a context manager
        ...

    with steps(["import engine", "build model", "load weights"], desc="[infer]") as step:
        step("import engine")                 # named phases of one slow task: shows
        ...                                   # "[infer] 1/3 import engine" and the time taken

    with notice_after(2.0, "[inspect] importing torch, reading the inputs"):
        ...                                   # one line, only if the block is still running
                                              # after 2 s (a quick failure stays one error line)

`enabled=False` (e.g. for `--json` runs that want a silent stderr) turns these into no-ops.
Set MINDSPEED_VITA_PROGRESS=0 in the environment to silence all progress output.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence

#: seconds between progress lines when stderr is not a terminal
LOG_INTERVAL_S = 5.0
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) {elapsed}<{remaining}, {rate_fmt}"
_LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {elapsed}, {rate_fmt}"


def progress_enabled(stream: Optional[IO] = None) -> bool:
    """False when MINDSPEED_VITA_PROGRESS=0 (any stream) or `stream` is closed."""
    if os.environ.get("MINDSPEED_VITA_PROGRESS", "1") == "0":
        return False
    return not getattr(stream or sys.stderr, "closed", False)


def _is_terminal(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Lines:
    """A file for tqdm that turns each redraw into one newline-terminated line."""

    def __init__(self, stream: IO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text and text != self.last:  # tqdm redraws the final state on close
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def progress(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[float] = None,
    desc: str = "",
    unit: str = "it",
    stream: Optional[IO] = None,
    enabled: bool = True,
    log_interval: float = LOG_INTERVAL_S,
    **tqdm_options: Any,
):
    """A tqdm progress object over `iterable` (or counting `total` by hand with `.update`).

    A bar when `stream` (default stderr) is a terminal, else one line every `log_interval`
    seconds. `enabled=False` or MINDSPEED_VITA_PROGRESS=0 gives tqdm's disabled object (the
    iterable passes through, `update` does nothing)."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    disable = not (enabled and progress_enabled(stream))
    if disable or _is_terminal(stream):
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            file=stream,
            disable=disable,
            dynamic_ncols=True,
            **tqdm_options,
        )
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    options = dict(
        bar_format=_LINE_FORMAT if total else _LINE_FORMAT_NO_TOTAL,
        mininterval=log_interval,
        maxinterval=max(log_interval, 10.0),
        miniters=1,
        smoothing=0.0,
        ascii=True,
    )
    options.update(tqdm_options)
    # " records/s" rather than tqdm's "records/s" glued to the number
    return tqdm(iterable, total=total, desc=desc, unit=" " + unit, file=_Lines(stream), **options)


@contextmanager
def steps(
    names: Sequence[str], *, desc: str, stream: Optional[IO] = None, enabled: bool = True
) -> Iterator[Callable[[str], None]]:
    """Named phases of one slow task. Yields `step(name)`: call it as each phase starts; a
    line "<desc> i/n <name>" is printed at once, and "<desc> ready in X s" at the end.
    On a terminal the phases share one tqdm bar."""
    stream = stream or sys.stderr
    show = enabled and progress_enabled(stream)
    bar = None
    if show and _is_terminal(stream):
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(names),
            desc=desc,
            file=stream,
            unit="step",
            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}",
        )
    start = time.perf_counter()
    done = 0

    def step(name: str) -> None:
        nonlocal done
        if bar is not None:
            bar.set_description_str(f"{desc} {name}")
            bar.update(done - bar.n)
        elif show:
            stream.write(f"{desc} {done + 1}/{len(names)} {name}\n")
            stream.flush()
        done += 1

    try:
        yield step
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.update(done - bar.n)
        bar.close()
    elif show and done:
        stream.write(f"{desc} ready in {elapsed:.1f} s\n")
        stream.flush()


@contextmanager
def notice_after(seconds: float, message: str, *, stream: Optional[IO] = None,
                 enabled: bool = True) -> Iterator[None]:
    """Print `message` (one line) if the block is still running after `seconds`.

    For a slow start (imports, reading inputs) whose failures should stay a single error line:
    a failure within `seconds` prints nothing extra; a slow start shows that work is going on."""
    stream = stream or sys.stderr
    if not (enabled and progress_enabled(stream)):
        yield
        return
    timer = threading.Timer(seconds, lambda: (stream.write(message + "\n"), stream.flush()))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
