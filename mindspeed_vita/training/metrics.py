"""Per-step metrics of a training run: `metrics.jsonl`, a progress line, TensorBoard, a plot.

Only global rank 0 writes. `metrics.jsonl` gets one JSON object per optimizer step:
step, loss, grad_norm, lr (per named param group), tokens (real tokens of the step), label
tokens, tokens_per_s, step_time_s, skipped_samples, skipped_steps, tflops (model TFLOP/s per
device), mfu (None when the device's peak is unknown, e.g. on CPU), and wall-clock fields.
On resume the file is cut back to the checkpoint's step, so the rows after a restart continue
the rows of the run that was interrupted.

TensorBoard (when the `tensorboard` package is installed, extra `[tensorboard]`): the same
scalars in `<save>/tensorboard` - `train/<field>` for every numeric field (loss, grad_norm,
tokens_per_s, skipped_*, ...) and `lr/<group>` per parameter group. A resumed run purges the
events after the checkpoint's step, as it cuts metrics.jsonl. Without the package one info line
says so and nothing else changes.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"
#: fields that depend on wall-clock time (everything else is reproducible bit for bit)
TIMING_FIELDS = ("step_time_s", "tokens_per_s", "tflops", "mfu", "elapsed_s")


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Rows of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Writes the rows (rank 0 only; other ranks get a writer that does nothing)."""

    def __init__(self, path: Optional[str], *, enabled: bool, resume_step: int = 0,
                 tensorboard_dir: Optional[str] = None):
        self.path = path
        self.enabled = enabled and path is not None
        self.rows: List[Dict[str, Any]] = []
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if os.path.isfile(path):  # keep the rows up to the checkpoint we resume from
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        with open(path, "w", encoding="utf-8") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        self.rows = kept
        if tensorboard_dir:
            self._tb = _summary_writer(tensorboard_dir, resume_step)

    def write(self, row: Dict[str, Any]) -> None:
        """Append one step's row (and its scalars to TensorBoard)."""
        if not self.enabled:
            return
        row = _finite_or_null(row)
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            step = row["step"]
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key != "step":
                    self._tb.add_scalar(f"train/{key}", value, step)
            for name, lr in row.get("lr", {}).items():
                self._tb.add_scalar(f"lr/{name}", lr, step)
            self._tb.flush()  # a killed run keeps its curve up to the last step

    def close(self, plot_path: Optional[str] = None) -> None:
        """Flush TensorBoard and draw the loss curve (if a path is given)."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
        if plot_path and self.rows:
            plot_loss(self.rows, plot_path)


def _finite_or_null(value):
    """`value` with every NaN/inf float (also inside dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _summary_writer(log_dir: str, resume_step: int):
    """torch's TensorBoard `SummaryWriter` on `log_dir`, or None (one info line) when the
    `tensorboard` package is not installed. On resume, events after `resume_step` are purged."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the optional `tensorboard` package
        logger.info("TensorBoard: the tensorboard package is not installed, not writing %s "
                    "(metrics.jsonl has every value; pip install 'mindspeed-vita[tensorboard]')",
                    log_dir)
        return None
    return SummaryWriter(log_dir, purge_step=resume_step + 1 if resume_step else None)


def plot_loss(rows: List[Dict[str, Any]], path: str, size=(800, 480)) -> None:
    """Loss per step as a PNG (drawn with Pillow, so no plotting library is needed)."""
    from PIL import Image, ImageDraw

    points = [(r["step"], r["loss"]) for r in rows
              if r.get("loss") is not None and math.isfinite(r["loss"])]
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), "training loss", fill="black")
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)],
              fill="black")
    if points:
        s0, s1 = points[0][0], max(points[-1][0], points[0][0] + 1)
        lo, hi = min(p[1] for p in points), max(p[1] for p in points)
        hi = hi if hi > lo else lo + 1.0

        def xy(step, loss):
            x = left + (step - s0) / (s1 - s0) * (width - left - right)
            y = top + (hi - loss) / (hi - lo) * (height - top - bottom)
            return x, y

        if len(points) > 1:
            draw.line([xy(*p) for p in points], fill=(31, 119, 180), width=2)
        for p in points:
            x, y = xy(*p)
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 119, 180))
        for value in (lo, (lo + hi) / 2, hi):
            draw.text((5, xy(s0, value)[1] - 6), f"{value:.3f}", fill="black")
        draw.text((left, height - bottom + 8), f"step {s0}", fill="black")
        draw.text((width - right - 70, height - bottom + 8), f"step {s1}", fill="black")
    img.save(path)
