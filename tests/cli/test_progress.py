"""The shared progress helper: lines with count, rate and time left off a terminal; a bar on
one; silent when disabled."""

import io
import re

from mindspeed_vita.progress import progress, steps


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_have_count_share_rate_and_eta():
    stream = io.StringIO()
    for _ in progress(range(50), desc="[t] records", unit="records", stream=stream, log_interval=0):
        pass
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[t] records: 0/50 (0%) 00:00<?, ? records/s"  # printed at the start
    assert re.fullmatch(
        r"\[t\] records: 50/50 \(100%\) \d\d:\d\d<00:00, [\d.]+ records/s", lines[-1]
    )
    assert len(lines) == len(set(lines))  # the final state is not repeated on close
    assert "\r" not in stream.getvalue()


def test_manual_counting_and_unknown_total():
    stream = io.StringIO()
    with progress(desc="[t] rows", unit="rows", stream=stream, log_interval=0) as bar:
        bar.update(3)
    assert re.search(r"\[t\] rows: 3 \d\d:\d\d, [\d.]+ rows/s", stream.getvalue())


def test_a_terminal_gets_a_bar_and_disabled_prints_nothing(monkeypatch):
    tty = _Terminal()
    for _ in progress(range(3), desc="[t]", stream=tty):
        pass
    assert "\r" in tty.getvalue() and "|" in tty.getvalue()
    quiet = io.StringIO()
    assert list(progress(range(3), stream=quiet, enabled=False)) == [0, 1, 2]
    monkeypatch.setenv("MINDSPEED_VITA_PROGRESS", "0")
    with progress(total=2, stream=quiet) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""


def test_steps_name_each_phase_at_once_and_the_total_time():
    stream = io.StringIO()
    with steps(["import", "load"], desc="[x]", stream=stream) as step:
        step("import")
        assert stream.getvalue() == "[x] 1/2 import\n"  # shown before the slow phase runs
        step("load")
    assert re.fullmatch(
        r"\[x\] 1/2 import\n\[x\] 2/2 load\n\[x\] ready in [\d.]+ s\n", stream.getvalue()
    )
    failed = io.StringIO()
    try:
        with steps(["a"], desc="[x]", stream=failed) as step:
            step("a")
            raise ValueError("bad")
    except ValueError:
        pass
    assert failed.getvalue() == "[x] 1/1 a\n"  # no "ready" after a failure


def test_notice_after_speaks_only_when_the_block_is_slow():
    import time

    from mindspeed_vita.progress import notice_after

    quick, slow = io.StringIO(), io.StringIO()
    with notice_after(5.0, "[x] still importing", stream=quick):
        pass
    with notice_after(0.05, "[x] still importing", stream=slow):
        deadline = time.monotonic() + 60
        while not slow.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(0.1)
    assert quick.getvalue() == "" and slow.getvalue() == "[x] still importing\n"
