"""Helpers of the tests that start an OpenAI-compatible server (`serve`, in this process or as
a command) and talk to it over loopback HTTP with the official client."""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, port: int, timeout: float,
                       poll: float = 0.5) -> None:
    """Poll `/health` on `port` until it answers; fail with `proc`'s output (its stdout, which
    the caller pipes with stderr) if the server process exits first, or after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(poll)
    raise AssertionError(f"the server on port {port} did not answer /health within {timeout} s")


def openai_client(port: int, timeout: float):
    """The official OpenAI client for the server on `port` (no retries: a failure shows)."""
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                         timeout=timeout)
