"""Start-up of the command: third-party warnings routed to the debug log, megatron-core's
`torch.compile` decorations deferred to the first call (same result, compiled once)."""

import json
import os
import subprocess
import sys

from mindspeed_vita import startup

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


SCRIPT = """
import logging, sys, warnings
from mindspeed_vita import startup
startup.configure_logging(verbose=sys.argv[1] == "verbose")
startup.route_third_party_warnings()
warnings.simplefilter("always")
warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
warnings.warn("full scope is deprecated. Use empty cuda_graph_scope.")
warnings.warn("our own warning that a user must see")
logging.getLogger("megatron.core.foo").warning("Set CUDA_DEVICE_MAX_CONNECTIONS to 1")
logging.getLogger("megatron.core.foo").warning("a third-party warning with news")
"""


def _stderr_of(mode):
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_known_third_party_warnings_go_to_the_debug_log_others_stay():
    text = _stderr_of("quiet")
    assert "Transformer Engine" not in text and "full scope" not in text
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in text
    assert "our own warning that a user must see" in text and "with news" in text
    verbose = _stderr_of("verbose")
    assert "DEBUG" in verbose and "Transformer Engine" in verbose and "full scope" in verbose
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in verbose


def test_lazy_compile_compiles_once_on_first_call_with_the_same_options():
    calls = []

    def fake_compile(fn, **options):
        calls.append((fn.__name__, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    lazy = startup.lazy_compile(fake_compile)

    @lazy
    def double(x):
        return 2 * x

    @lazy(dynamic=True)
    def triple(x):
        return 3 * x

    assert calls == [] and double.__name__ == "double"
    assert double(4) == ("compiled", 8) and double(5) == ("compiled", 10)
    assert triple(2) == ("compiled", 6)
    assert calls == [("double", {}), ("triple", {"dynamic": True})]


def test_the_cli_imports_megatron_without_dynamo():
    repo = REPO
    script = (
        "import json, sys\nfrom mindspeed_vita import startup\nstartup.prepare()\n"
        "import megatron.core\nfrom megatron.core.transformer import TransformerConfig\n"
        "from megatron.core import jit\nimport torch\n"
        "print(json.dumps(['torch._dynamo' in sys.modules, torch.compile.__module__]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=repo),
    )
    assert r.returncode == 0, r.stderr
    dynamo_loaded, compile_module = json.loads(r.stdout)
    assert not dynamo_loaded  # the seconds of TorchDynamo + Inductor import were not paid
    assert compile_module.startswith("torch")  # torch.compile itself is restored
    assert "Transformer Engine" not in r.stderr
