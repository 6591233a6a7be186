"""Rewrite tests/baselines/demo_stage2_loss.json from a fresh run of the regression test's
command (`python -m tests.training.write_baseline`, from the repository root).

Run it only when a change is MEANT to move the demo's loss curve (the synthetic data, the demo
stage 2 config, the model's initialisation), and say so in the commit: the file is what
tests/training/test_resume.py holds every other change to (within 1%)."""
from __future__ import annotations

import json
import os
import tempfile

from tests.training.test_resume import BASELINE, STEPS
from tests.training.train_helpers import rows, run, synthetic_data, train_command


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(os.path.join(tmp, "synth"))
        run_dir = os.path.join(tmp, "run")
        run(train_command(data, run_dir, STEPS))
        losses = {str(r["step"]): r["loss"] for r in rows(run_dir)}
    with open(BASELINE) as f:
        baseline = json.load(f)
    baseline["loss"] = losses
    with open(BASELINE, "w") as f:
        f.write(json.dumps(baseline, indent=2) + "\n")
    print(f"wrote {BASELINE}: {losses}")


if __name__ == "__main__":
    main()
