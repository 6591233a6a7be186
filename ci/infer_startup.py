"""How `mindspeed-vita infer` spends its time before the first token: imports vs work.

    python ci/infer_startup.py [--checkpoint DIR --image PNG] [--runs N]

Runs `infer` N times in fresh processes (4 new tokens) and prints, as medians, the seconds from
process start to the first chosen token, the seconds of that spent importing modules (the sum
of the top-level `python -X importtime` entries, measured in separate runs under the flag, with
their own time to the first token), the self-time of imports by top package, and the load
average. Without --checkpoint a tiny random checkpoint (configs/model/tiny.yaml) is written to
a temporary directory first. Numbers on a shared machine move with its load: compare trees in
alternating runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the child: what `infer` does before its first heavy import (startup.prepare in cli.main, the
#: engine deferral in infer's run), then the sampler wrapped to stamp the first token
CHILD = r"""
import sys, time
from mindspeed_vita import cli, startup
startup.prepare()
startup.defer_engine_package_init()
import mindspeed_vita.inference.engine as engine
choose = engine.choose_next_token
def first_token_stamp(*args, **kwargs):
    if not getattr(first_token_stamp, "done", False):
        first_token_stamp.done = True
        sys.stderr.write("FIRST_TOKEN %.6f\n" % time.time())
    return choose(*args, **kwargs)
engine.choose_next_token = first_token_stamp
sys.exit(cli.main(["infer", "--checkpoint", sys.argv[1], "--prompt", "Describe the picture.",
                   "--image", sys.argv[2], "--max-new-tokens", "4"]))
"""
_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _run(checkpoint: str, image: str, importtime: bool):
    env = dict(os.environ, PYTHONPATH=REPO, MINDSPEED_VITA_PROGRESS="0")
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + [
        "-c", CHILD, checkpoint, image]
    start = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    if r.returncode != 0:
        sys.exit(f"infer failed:\n{r.stderr[-3000:]}")
    first = float(re.search(r"FIRST_TOKEN (\S+)", r.stderr).group(1)) - start
    imports, by_package = 0.0, {}
    for line in r.stderr.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            if len(m.group(3)) == 1:  # top level: its cumulative time is not counted elsewhere
                imports += int(m.group(2)) / 1e6
            package = m.group(4).split(".")[0]
            by_package[package] = by_package.get(package, 0.0) + int(m.group(1)) / 1e6
    return first, imports, by_package


def _tiny_checkpoint(out: str):
    sys.path.insert(0, REPO)
    from tests.dist_utils import run_distributed
    from tests.inference.test_cp_cli import _save

    run_distributed(_save, 1, args=(out,))
    return os.path.join(out, "ckpt"), os.path.join(out, "img.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--image")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if bool(args.checkpoint) != bool(args.image):
        parser.error("give --checkpoint and --image together, or neither")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, image = ((args.checkpoint, args.image) if args.checkpoint
                             else _tiny_checkpoint(scratch))
        load = os.getloadavg()
        plain = [_run(checkpoint, image, False)[0] for _ in range(args.runs)]
        timed = [_run(checkpoint, image, True) for _ in range(args.runs)]
    med = statistics.median
    first_timed, imports = med(t[0] for t in timed), med(t[1] for t in timed)
    packages = {name: med(t[2].get(name, 0.0) for t in timed)
                for name in set().union(*(t[2] for t in timed))}
    print(json.dumps({
        "load_average_before_after": [load[0], os.getloadavg()[0]],
        "first_token_s": round(med(plain), 2), "first_token_s_all": [round(x, 2) for x in plain],
        "under_importtime": {"first_token_s": round(first_timed, 2),
                             "imports_s": round(imports, 2),
                             "imports_fraction": round(imports / first_timed, 2)},
        "import_self_time_s_by_package": dict(sorted(
            ((k, round(v, 2)) for k, v in packages.items() if v >= 0.01),
            key=lambda kv: -kv[1])[:12]),
    }, indent=1))


if __name__ == "__main__":
    main()
