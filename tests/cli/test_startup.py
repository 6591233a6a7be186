"""Start-up of the command: third-party warnings routed to the debug log, megatron-core's
`torch.compile` decorations deferred to the first call (same result, compiled once), and what
`infer` imports: a structural check (sys.modules), which holds however loaded the machine is."""

import json
import os
import subprocess
import sys

import pytest

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


def _run_python(script, timeout=600):
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_deferred_package_init_imports_only_what_is_used_and_keeps_every_name():
    script = (
        "import json, sys\nfrom mindspeed_vita import startup\n"
        "startup.prepare()\nstartup.defer_engine_package_init()\n"
        "from megatron.core import parallel_state, tensor_parallel\n"
        "from megatron.core.transformer.transformer_block import TransformerBlock\n"
        "import megatron.core\n"
        "before = [m in sys.modules for m in ('megatron.core.timers', "
        "'megatron.core.distributed', 'megatron.core.optimizer', 'torch._dynamo', "
        "'torch.distributed.tensor')]\n"
        "names = [megatron.core.__version__, megatron.core.Timers.__name__, "
        "megatron.core.DistributedDataParallel.__name__, megatron.core.mpu is parallel_state]\n"
        "from torch.distributed.tensor import DTensor  # hidden from megatron only\n"
        "print(json.dumps([before, names, 'megatron.core.timers' in sys.modules]))\n"
    )
    before, names, timers_after = json.loads(_run_python(script).stdout)
    assert before == [False, False, False, False, False]
    assert names[1:] == ["Timers", "DistributedDataParallel", True] and names[0]
    assert timers_after  # the package's own names ran its __init__


HEAVY_FOR_INFER = ("transformers", "megatron.core.distributed", "megatron.core.optimizer",
                   "megatron.core.timers", "torch.utils.tensorboard", "torch._dynamo",
                   "torch.distributed.tensor", "sympy")
PROMPT = "Describe it."


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests.dist_utils import run_distributed
    from tests.inference.test_cp_cli import _save

    out = str(tmp_path_factory.mktemp("startup_ckpt"))
    run_distributed(_save, 1, args=(out,))
    return out


def _generate_with_the_whole_engine(rank, world_size, ckpt, image):
    """The same request in a process that imported megatron-core (and DTensor) eagerly."""
    import megatron.core.utils

    from backends import get_backend
    from mindspeed_vita.inference.engine import Generator
    from mindspeed_vita.models.build import load_pretrained
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout())
    model, tokenizer, _ = load_pretrained(ckpt, backend, groups=groups,
                                          config_update={"lm_head": "logits-masked"})
    model.eval()
    result = Generator(model, tokenizer).generate(PROMPT, [image], max_new_tokens=3)
    return result.token_ids, result.logprobs, megatron.core.utils.HAVE_DTENSOR


def test_infer_imports_only_what_generation_needs_and_generates_the_same(tiny_checkpoint):
    """`infer` needs torch, a few megatron-core modules and the tokenizers library; the
    transformers tokenizer stack, megatron's data-parallel wrapper, optimizer and timers
    (TensorBoard), DTensor (SymPy) and TorchDynamo cost seconds of start-up and are not
    imported, and the tokens are those of a process that imported all of it."""
    from tests.dist_utils import run_distributed

    ckpt = os.path.join(tiny_checkpoint, "ckpt")
    image = os.path.join(tiny_checkpoint, "img.png")
    script = (
        "import json, sys\nfrom mindspeed_vita import cli\n"
        f"rc = cli.main(['infer', '--checkpoint', {ckpt!r}, '--prompt', {PROMPT!r}, "
        f"'--image', {image!r}, '--max-new-tokens', '3', '--json'])\n"
        f"print(json.dumps([rc, [m for m in {HEAVY_FOR_INFER!r} if m in sys.modules], "
        "'megatron.core.transformer.transformer_block' in sys.modules]))\n"
    )
    r = _run_python(script)
    lines = r.stdout.strip().splitlines()
    result = json.loads(lines[0])
    rc, heavy, model_from_megatron = json.loads(lines[-1])
    assert rc == 0 and heavy == [] and model_from_megatron
    [(token_ids, logprobs, had_dtensor)] = run_distributed(
        _generate_with_the_whole_engine, 1, args=(ckpt, image))
    assert had_dtensor  # the reference really ran with megatron's DTensor support
    assert result["token_ids"] == token_ids and len(token_ids) == 3
    assert result["logprobs"] == pytest.approx(logprobs, abs=1e-5)
